"""Write WebDataset shards: `ce-make-shards --src digits --out outputs/shards/digits` (or
`python -m jobs.make_shards ...`).

--src is `digits` (scikit-learn's bundled digits, the embedded default; split 70/10/20 into
train/val/test shards unless --split-val / --split-test say otherwise) or a folder laid out
ROOT/<class>/<image>. The val split is what every choice is made on (checkpoints, searches, the
probe's C); the test split is read only to score.
--out is a folder or an fsspec URL (s3://bucket/shards, gs://..., with s3fs / gcsfs installed).
--workers N writes whole shards in N processes; the output is byte-identical for every N
(docs/make_shards.md).
Prints the brace pattern(s) to give the loader (data.train_shards / data.val_shards).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs._cli import Work, prog_name, run_cli, run_main
from pipeline.data.manifest import describe
from pipeline.data.writer import SourceError, digits_source, folder_source, write_shards

PROG = ("ce-make-shards", "jobs.make_shards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__)
    p.add_argument("--src", required=True, help="'digits' or an image folder ROOT/<class>/<img>")
    p.add_argument(
        "--out", required=True, help="folder or fsspec URL (s3://, gs://) for shards + manifest"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the split")
    p.add_argument(
        "--split-test",
        type=float,
        default=None,
        help="held-out share written as <prefix>-test-* shards (default: 0.2 for digits, 0 else)",
    )
    p.add_argument(
        "--split-val",
        type=float,
        default=None,
        help="share of all samples written as <prefix>-val-* shards, chosen by a hash of the key "
        "(default: 0.1 for digits, 0 else)",
    )
    p.add_argument("--prefix", default=None, help="shard name prefix (default: source name)")
    p.add_argument("--digits-size", type=int, default=32, help="digits are upscaled to this")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this prefix's shards in --out (only those its manifest lists are deleted)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes writing shards (default 1; 0: one per CPU); same output for any N",
    )
    return p.parse_args(argv)


def resolve_workers(workers: int) -> int:
    """--workers as a process count: 0 means one per CPU this process may run on."""
    if workers < 0:
        raise SourceError(f"--workers must be >= 0 (0: one per CPU), got {workers}")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(argv: list[str] | None = None) -> Work:
    """Parse the flags and list the source (a missing or empty folder fails here); returns the
    shard writing to run."""
    args = parse_args(argv)
    if args.src == "digits":
        source, default_split, default_prefix = digits_source(args.digits_size), 0.2, "digits"
    else:
        root = Path(args.src)
        source, default_split, default_prefix = folder_source(root), 0.0, root.resolve().name
    split = args.split_test if args.split_test is not None else default_split
    val = args.split_val if args.split_val is not None else (0.1 if args.src == "digits" else 0.0)
    workers = resolve_workers(args.workers)

    def work() -> dict:
        manifest = write_shards(
            source,
            args.out,
            prefix=args.prefix or default_prefix,
            shard_size=args.shard_size,
            seed=args.seed,
            test_fraction=split,
            val_fraction=val,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
            workers=workers,
        )
        print(describe(manifest, args.out))
        return manifest

    return work


def main(argv: list[str] | None = None) -> dict:
    """Write the shards, every exception raised; returns the manifest."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-make-shards` console script: exit 2 with one line on a usage error (a missing
    source folder, no images, shards already in --out without --overwrite)."""
    run_cli(prog_name(*PROG), prepare, argv, user_errors=(FileExistsError,))


if __name__ == "__main__":
    cli()
