"""Frozen-feature evaluation job: linear probes, kNN and inpainting quality for any number of
encoders and the baselines, logged as one comparable table to one MLflow run.

    ce-probe --encoder ce=runs:/<run_id>/encoder/generator.pt \\
        --train-shards 'data/cifar10-train-{000000..000009}.tar' \\
        --test-shards 'data/cifar10-test-{000000..000001}.tar' --image-size 32 \\
        --output-root outputs [--layers conv2,conv3] [--ray]

An encoder is a checkpoint path, runs:/<run_id>/encoder[/generator.pt], or a logged MLflow Model:
models:/NAME@alias, models:/NAME/VERSION, models:/m-<id> (encoder only: no inpainting rows).
Thin: parse, check the shards and local files named, call `evaluation.run.run_probe` (protocol +
one MLflow run), print. `--print-config` prints the resolved settings (YAML) and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import yaml

from evaluation.run import ProbeRunConfig, run_probe
from jobs._cli import Work, prog_name, run_cli, run_main

PROG = ("ce-probe", "jobs.probe")
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

D = ProbeRunConfig  # the flag defaults are the config's


def _encoder_arg(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--encoder {text!r}: expected NAME=PATH_OR_URI")
    return name, uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--encoder",
        action="append",
        type=_encoder_arg,
        default=[],
        help="NAME=checkpoint path, runs:/<id>/encoder[/generator.pt], models:/NAME@alias or "
        "models:/NAME/VERSION; repeatable",
    )
    p.add_argument("--train-shards", required=True)
    p.add_argument("--test-shards", required=True)
    p.add_argument("--layers", default=D.layers, help="comma-separated encoder layers ('' = all)")
    p.add_argument("--image-size", type=int, default=D.image_size)
    p.add_argument("--output-root", default=D.output_root)
    p.add_argument(
        "--tracking-uri",
        default=D.tracking_uri,
        help="'' = $MLFLOW_TRACKING_URI, else sqlite:///<output-root>/mlflow.db",
    )
    p.add_argument("--experiment", default=D.experiment)
    p.add_argument("--ray", action="store_true", help="fan feature extraction out over Ray")
    p.add_argument("--ray-tasks", type=int, default=D.ray_tasks)
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--max-dim", type=int, default=D.max_dim, help="pooled feature size per layer")
    p.add_argument(
        "--c-grid",
        default=D.c_grid,
        help="probe Cs at the sweep's rows; the refit scales C to its own rows",
    )
    p.add_argument(
        "--sweep-max-samples",
        type=int,
        default=D.sweep_max_samples,
        help="C sweep on at most this many carved train rows (0 = all)",
    )
    p.add_argument(
        "--max-iter",
        type=int,
        default=D.max_iter,
        help="lbfgs cap per probe fit; a fit that reaches it is reported unconverged",
    )
    p.add_argument("--tol", type=float, default=D.tol, help="lbfgs gradient tol")
    p.add_argument("--inpaint-images", type=int, default=D.inpaint_images)
    p.add_argument(
        "--probe",
        choices=("sklearn", "streaming"),
        default=D.probe,
        help="linear probe: sklearn (in memory) or streaming (chunks of the Parquet cache)",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved settings (YAML) and exit"
    )
    return p.parse_args(argv)  # fmt: skip


def config_from(args: argparse.Namespace) -> ProbeRunConfig:
    encoders = dict(args.encoder)
    if len(encoders) != len(args.encoder):
        raise ValueError(f"--encoder names must be unique, got {[n for n, _ in args.encoder]}")
    names = {f.name for f in dataclasses.fields(ProbeRunConfig)} - {"encoders"}
    return ProbeRunConfig(encoders=encoders, **{k: getattr(args, k) for k in names})


def check_inputs(cfg: ProbeRunConfig) -> None:
    """The shards and local encoder files named exist (MLflow URIs are checked at load)."""
    from pipeline.data import expand_urls

    for flag, urls in (("--train-shards", cfg.train_shards), ("--test-shards", cfg.test_shards)):
        try:
            expand_urls(urls)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{flag}: {err}") from err
    for name, uri in cfg.encoders.items():
        if not uri.startswith(URI_SCHEMES) and not Path(uri).expanduser().exists():
            raise FileNotFoundError(f"--encoder {name}={uri}: no such checkpoint file or folder")
    if cfg.batch_size < 1 or cfg.max_dim < 1 or cfg.image_size < 1:
        raise ValueError("--batch-size, --max-dim and --image-size must be >= 1")


def prepare(argv: list[str] | None = None) -> Work | None:
    """Parse and check the flags and the inputs they name; returns the probe run to start
    (None with --print-config)."""
    args = parse_args(argv)
    cfg = config_from(args)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="", flush=True)
        return None
    check_inputs(cfg)
    return lambda: probe(cfg)


def probe(cfg: ProbeRunConfig) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run_probe(cfg)
    print(res.summary())
    return res.run_id


def main(argv: list[str] | None = None) -> str | None:
    """Run the job, every exception raised; returns the MLflow run id (None: --print-config)."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-probe` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
