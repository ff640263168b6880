"""Pretrain a context encoder with Ray Train (DDP), tracked in MLflow.

    ce-pretrain --config digits train.max_steps=200      (or: python -m jobs.pretrain ...)
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/cifar10.yaml

Every setting is a config key; overrides are `section.key=value`. Bad keys, bad types, missing
shards and an unreachable tracking server all fail here, before any worker starts (exit 2, one
line). Running again with the same `run.run_name` resumes that run from its last checkpoint.
`--print-config` prints the resolved config and exits.
"""

from __future__ import annotations

import argparse

from jobs._cli import Work, check_shards, prog_name, resolve_config, run_cli, run_main
from pipeline.config import Config, dump_config, load_config
from pipeline.pretrain import PretrainResult, run_pretrain
from pipeline.runtime import preflight, resolve_paths

PROG = ("ce-pretrain", "jobs.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument(
        "--config",
        help="YAML config: a path, or a shipped config's name (cifar10, digits, paper128).\n"
        "Without it, the built-in defaults (the paper's 128-px setting), which name no\n"
        "data: give data.train_shards=... as an override.",
    )
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML) and exit"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def prepare(argv: list[str] | None = None) -> Work | None:
    """Parse, load and validate the config, check the shards and the tracking store it names;
    returns the training run to start (None with --print-config)."""
    args = parse_args(argv)
    cfg = load_config(resolve_config(args.config), args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="", flush=True)
        return None
    cfg_abs = resolve_paths(cfg)
    check_shards(cfg_abs)
    preflight(cfg_abs)  # the tracking store too: all before Ray starts
    return lambda: train(cfg, args.address)


def train(cfg: Config, address: str = "") -> PretrainResult:
    print(dump_config(cfg), flush=True)
    res = run_pretrain(cfg, address=address)
    print(f"[pretrain] done: checkpoint {res.checkpoint_path}")
    print(f"[pretrain] MLflow run {res.mlflow_run_id} in {res.tracking_uri}")
    print(f"[pretrain] encoder: runs:/{res.mlflow_run_id}/encoder/generator.pt")
    print(f"[pretrain] browse: {res.run_url}")
    return res


def main(argv: list[str] | None = None) -> PretrainResult | None:
    """The job, every exception raised (tests, library callers); None with --print-config."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-pretrain` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
