"""Fine-tune a whole encoder plus a linear head with labels, on Ray Train (DDP), tracked in
MLflow; the epoch is chosen on a val carve of the training images, the test shards scored once.

    ce-finetune --config finetune_cifar10 --encoder ce=runs:/<run_id>/encoder/generator.pt
    ce-finetune --config finetune_cifar10 --encoder random seed=1
    (or: python -m jobs.finetune ...)

An encoder is a checkpoint path, runs:/..., models:/..., s3://... or `random` (the config's
`model` at random init from `seed`), optionally named NAME=... for the result row. Overrides are
`section.key=value` (data.label_fraction=1.0, optim.epochs=5). Writes
<output_root>/finetune/<run>/result.{csv,json}, the row `ce-benchmark` reads (protocol
finetune). The recipe and its budget: docs/finetune.md.
"""

from __future__ import annotations

import argparse

from jobs._cli import Work, prog_name, resolve_config, run_cli, run_main
from pipeline.finetune import FinetuneResult

PROG = ("ce-finetune", "jobs.finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--config", help="fine-tune YAML: a path or a shipped name (finetune_cifar10)")
    p.add_argument("--encoder", help="[NAME=]checkpoint path, runs:/, models:/ URI, or random "
                   "(default: the config's `encoder`)")  # fmt: skip
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def prepare(argv: list[str] | None = None) -> Work | None:
    """Parse, load and validate the config, check the shards, the tracking store and the
    encoder; returns the fine-tune to run (None with --print-config)."""
    from pipeline.config import dump_config, tracking_uri
    from pipeline.data.urls import expand_urls
    from pipeline.finetune import load_finetune_config, resolve_finetune_paths
    from pipeline.tracking import check_tracking

    args = parse_args(argv)
    extra = [f"encoder={args.encoder}"] if args.encoder else []
    cfg = load_finetune_config(resolve_config(args.config), extra + args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="", flush=True)
        return None
    cfg = resolve_finetune_paths(cfg)
    for key in ("train_shards", "test_shards"):
        try:
            expand_urls(getattr(cfg.data, key))
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.{key}: {err}") from err
    check_tracking(tracking_uri(cfg.run))
    enc = _load_encoder(cfg)  # a missing checkpoint is the user's: one line, exit 2
    return lambda: finetune(cfg, enc, args.address)


def _load_encoder(cfg):
    from evaluation.finetune_source import encoder_init, split_encoder_arg
    from pipeline.config import tracking_uri
    from pipeline.storage import local_root

    name, uri = split_encoder_arg(cfg.encoder)
    download = local_root(cfg.run.output_root) / "finetune" / "encoders"
    return encoder_init(name, uri, model=cfg.model, seed=cfg.seed, download_dir=download,
                        tracking_uri=tracking_uri(cfg.run))  # fmt: skip


def finetune(cfg, enc, address: str = "") -> FinetuneResult:
    from pipeline.finetune import run_finetune

    res = run_finetune(cfg, enc, address=address)
    row = res.row
    print(f"[finetune] test top-1 {row['test_top1']:.2f}% (95% CI {row['test_ci_low']:.2f}-"
          f"{row['test_ci_high']:.2f}), val {row['val_top1']:.2f}%")  # fmt: skip
    print(f"[finetune] result row: {res.row_csv}")
    print(f"[finetune] MLflow run {res.run_id} in {res.tracking_uri}")
    return res


def main(argv: list[str] | None = None) -> FinetuneResult | None:
    """The job, every exception raised (tests, library callers); None with --print-config."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-finetune` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
