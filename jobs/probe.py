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
The probe logs validation top-1 per C and layer; `ce-benchmark` chooses on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import yaml

from evaluation.run import ProbeRunConfig, check_inputs, run_probe
from jobs._cli import Work, prog_name, run_cli, run_main

PROG = ("ce-probe", "jobs.probe")
D = ProbeRunConfig  # the flag defaults are the config's


def _encoder_arg(text: str) -> tuple[str, str]:
    name, sep, uri = text.partition("=")
    if not sep or not name or not uri:
        raise argparse.ArgumentTypeError(f"--encoder {text!r}: expected NAME=PATH_OR_URI")
    return name, uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--encoder", action="append", type=_encoder_arg, default=[],
        help="NAME=checkpoint path, runs:/<id>/encoder[/generator.pt], models:/NAME@alias or "
        "models:/NAME/VERSION; repeatable")  # fmt: skip
    add("--train-shards", required=True)
    add("--test-shards", required=True)
    add("--layers", default=D.layers, help="comma-separated encoder layers ('' = all)")
    add("--image-size", type=int, default=D.image_size)
    add("--output-root", default=D.output_root)
    add("--tracking-uri", default=D.tracking_uri,
        help="'' = $MLFLOW_TRACKING_URI, else sqlite:///<output-root>/mlflow.db")  # fmt: skip
    add("--experiment", default=D.experiment)
    add("--ray", action="store_true", help="fan feature extraction out over Ray")
    add("--ray-tasks", type=int, default=D.ray_tasks)
    add("--batch-size", type=int, default=D.batch_size)
    add("--max-dim", type=int, default=D.max_dim, help="pooled feature size per layer")
    add("--c-grid", default=D.c_grid,
        help="probe Cs at the sweep's rows; the refit scales C to its own rows")  # fmt: skip
    add("--sweep-max-samples", type=int, default=D.sweep_max_samples,
        help="C sweep on at most this many carved train rows (0 = all)")  # fmt: skip
    add("--max-iter", type=int, default=D.max_iter,
        help="lbfgs cap per probe fit; a fit that reaches it is reported unconverged")  # fmt: skip
    add("--tol", type=float, default=D.tol, help="lbfgs gradient tol")
    add("--inpaint-images", type=int, default=D.inpaint_images)
    add("--probe", choices=("sklearn", "streaming"), default=D.probe,
        help="sklearn (in memory) or streaming (chunks of the Parquet cache)")  # fmt: skip
    add("--print-config", action="store_true", help="print the resolved settings (YAML), exit")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> ProbeRunConfig:
    encoders = dict(args.encoder)
    if len(encoders) != len(args.encoder):
        raise ValueError(f"--encoder names must be unique, got {[n for n, _ in args.encoder]}")
    names = {f.name for f in dataclasses.fields(ProbeRunConfig)} - {"encoders"}
    return ProbeRunConfig(encoders=encoders, **{k: getattr(args, k) for k in names})


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
