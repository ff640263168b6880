"""Search the loss weights, learning rates and mask type with Ray Tune.

    ce-tune --config tune_digits [num_samples=8 ...]      (or: python -m jobs.tune ...)

Each trial is a full Ray Train pretraining run built by `pipeline.ray_train.build_trainer`, the
same function `jobs.pretrain` uses. Trials are ranked by a score that does not depend on the
weights being searched (the weighted total loss would): the held-out masked reconstruction error
(`val_rec_l2`) or a kNN probe on frozen features of a labelled subset (`knn_top1`); both are
recorded at every checkpoint and ASHA stops weak trials on the chosen one. Running the same
command again after an interruption continues the search.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from jobs._cli import Work, check_shards, prog_name, resolve_config, run_cli, run_main
from pipeline.config import from_dict, to_dict
from pipeline.runtime import preflight, resolve_paths
from pipeline.search import SearchResult, TuneSettings, load_settings, run_search

PROG = ("ce-tune", "jobs.tune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument(
        "--config",
        required=True,
        help="tune YAML: a path, or a shipped config's name (tune_digits)",
    )
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved search settings (YAML, pretrain_config absolute) and exit",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tune YAML")
    return p.parse_args(argv)


def resolved_settings_yaml(settings: TuneSettings, path: Path) -> str:
    """The settings as a tune YAML that `load_settings` reads back to equal settings."""
    base = str((path.parent / settings.pretrain_config).resolve())
    return yaml.safe_dump(to_dict(dataclasses.replace(settings, pretrain_config=base)),
                          sort_keys=False)  # fmt: skip


def prepare(argv: list[str] | None = None) -> Work | None:
    """Parse, load the settings and the base config, check its shards and tracking store;
    returns the search to run (None with --print-config)."""
    args = parse_args(argv)
    path = resolve_config(args.config)
    settings, base = load_settings(path, args.overrides)
    if args.print_config:
        print(resolved_settings_yaml(settings, path), end="", flush=True)
        return None
    cfg = resolve_paths(from_dict(base))
    check_shards(cfg)
    preflight(cfg)
    return lambda: search(settings, base, args.address)


def search(settings: TuneSettings, base: dict, address: str = "") -> SearchResult:
    from evaluation.knn_score import KnnScore

    res = run_search(settings, base, address=address, make_score=KnnScore)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.table.to_string(index=False))
    print(f"[tune] best config (trial {res.best_trial_id}, final score): {res.best_config_path}")
    print(f"[tune] MLflow parent run {res.parent_run_id} in {res.tracking_uri}")
    return res


def main(argv: list[str] | None = None) -> SearchResult | None:
    """The job, every exception raised (tests, library callers); None with --print-config."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-tune` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
