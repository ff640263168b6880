"""Frozen-feature evaluation job: linear probes, kNN and inpainting quality for any number of
encoders and the baselines, logged as one comparable table to one MLflow run.

    python -m jobs.probe --encoder ce=runs:/<run_id>/encoder/generator.pt \\
        --train-shards 'data/cifar10-train-{000000..000009}.tar' \\
        --test-shards 'data/cifar10-test-{000000..000001}.tar' --image-size 32 \\
        --output-root outputs [--layers conv2,conv3] [--ray]

Thin: parse, (join Ray), call `evaluation.protocol.evaluate_encoders`, log to MLflow, print.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path

import pandas as pd

from evaluation import report
from evaluation.probe import ProbeSettings, c_grid_from
from evaluation.protocol import ProtocolSettings, evaluate_encoders
from pipeline.tracking import RunLogger, check_tracking, client, end_run, experiment_id


def _encoder_arg(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--encoder {text!r}: expected NAME=PATH_OR_RUNS_URI")
    return name, uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--encoder",
        action="append",
        type=_encoder_arg,
        default=[],
        help="NAME=checkpoint path or runs:/<id>/encoder[/generator.pt]; repeatable",
    )
    p.add_argument("--train-shards", required=True)
    p.add_argument("--test-shards", required=True)
    p.add_argument("--layers", default="", help="comma-separated encoder layers ('' = all)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--output-root", default="outputs")
    p.add_argument("--tracking-uri", default="", help="'' = sqlite:///<output-root>/mlflow.db")
    p.add_argument("--experiment", default="context-encoder-probe")
    p.add_argument("--ray", action="store_true", help="fan feature extraction out over Ray")
    p.add_argument("--ray-tasks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-dim", type=int, default=4096, help="pooled feature size per layer")
    p.add_argument(
        "--c-grid",
        default=",".join(map(str, ProbeSettings.c_grid)),
        help="probe Cs at the sweep's rows; the refit scales C to its own rows",
    )
    p.add_argument(
        "--sweep-max-samples",
        type=int,
        default=ProbeSettings.sweep_max_samples,
        help="C sweep on at most this many carved train rows (0 = all)",
    )
    p.add_argument(
        "--max-iter",
        type=int,
        default=ProbeSettings.max_iter,
        help="lbfgs cap per probe fit; a fit that reaches it is reported unconverged",
    )
    p.add_argument("--tol", type=float, default=ProbeSettings.tol, help="lbfgs gradient tol")
    p.add_argument("--inpaint-images", type=int, default=2000)
    return p.parse_args(argv)  # fmt: skip


def settings_from(args: argparse.Namespace) -> ProtocolSettings:
    grid = c_grid_from([float(v) for v in args.c_grid.split(",") if v.strip()])
    return ProtocolSettings(
        batch_size=args.batch_size,
        max_dim=args.max_dim,
        probe=ProbeSettings(
            c_grid=grid,
            sweep_max_samples=args.sweep_max_samples,
            max_iter=args.max_iter,
            tol=args.tol,
        ),
        inpaint_images=args.inpaint_images,
    )


def _metric_name(*parts: str) -> str:
    # MLflow metric names take letters, digits and _ - . / space only; keep them readable.
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def log_results(
    logger: RunLogger, table: pd.DataFrame, out_dir: Path, params: dict[str, object]
) -> None:
    """Params, one metric per (metric, encoder, layer), and every file the protocol wrote."""
    logger.params(params)
    metrics = {
        _metric_name(r.metric, r.encoder, r.layer): r.value for r in table.itertuples(index=False)
    }
    logger.metrics(metrics, step=0)
    for path in sorted(out_dir.iterdir()):
        if path.is_file():
            logger.file(path, "evaluation")


def main(argv: list[str] | None = None) -> str:
    """Run the job; returns the MLflow run id."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    root = Path(args.output_root).resolve()
    uri = args.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    check_tracking(uri)  # fail before minutes of extraction, not after
    encoders = dict(args.encoder)
    if len(encoders) != len(args.encoder):
        raise SystemExit(f"--encoder names must be unique, got {[n for n, _ in args.encoder]}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = root / "probe" / stamp
    if args.ray:
        from jobs.ray_connect import connect_ray

        connect_ray()  # joins RAY_ADDRESS when set, else starts a local Ray
    settings = settings_from(args)
    run_id = (
        client(uri)
        .create_run(experiment_id(uri, args.experiment), run_name=f"probe-{stamp}")
        .info.run_id
    )
    ok = False
    try:
        table = evaluate_encoders(
            encoders,
            train_urls=args.train_shards,
            test_urls=args.test_shards,
            layers=[s for s in args.layers.split(",") if s] or None,
            cache_dir=root / "feature_cache",
            out_dir=out_dir,
            image_size=args.image_size,
            settings=settings,
            tracking_uri=uri,
            use_ray=args.ray,
            ray_tasks=args.ray_tasks,
        )
        logged = ("train_shards", "test_shards", "layers", "image_size", "max_dim", "c_grid",
                  "sweep_max_samples", "max_iter", "tol", "ray")  # fmt: skip
        params = {f"encoder.{n}": u for n, u in encoders.items()}
        params |= {k: getattr(args, k) for k in logged}
        log_results(RunLogger(uri, run_id), table, out_dir, params)
        ok = True
    finally:
        end_run(uri, run_id, ok)
    print(report.format_table(table))
    print(f"MLflow run {run_id} in {uri}; outputs in {out_dir}")
    return run_id


if __name__ == "__main__":
    main()
