"""The whole pipeline on one machine, on the embedded default (scikit-learn's digits):

    ce-end-to-end [--output-root outputs/e2e] [--steps 300] [--trials 4]

1. shards from the digits (train / val / test); 2. a Ray Train pretraining (2 DDP workers);
3. a Ray Tune search; 4. linear probes of the pretrained and the search's chosen encoder against
random init and raw pixels; 5. the results table and the `mlflow ui` command. Steps 2-3
(`select_encoders`) read train and val only; the probe (`score`) alone reads test. The chosen
trial is best_config.yaml's (ranked by its final score) and its final encoder is the one probed.
Each step is the library call the individual jobs make; nothing here copies their logic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evaluation.e2e_stages import Selected, Splits, score, select_encoders, stage
from jobs._cli import Work, prog_name, run_cli, run_main
from pipeline.storage import is_uri

PROG = ("ce-end-to-end", "jobs.end_to_end")


def make_digit_shards(out: Path) -> Splits:
    """Digits shards under `out` (reused when already written)."""
    from jobs import make_shards

    if not (out / "manifest.json").is_file():
        make_shards.main(["--src", "digits", "--out", str(out)])
    return Splits(*(str(out / f"digits-{split}-*.tar") for split in ("train", "val", "test")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--output-root", default="outputs/e2e", help="a local folder")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--trials", type=int, default=4, help="Tune trials")
    p.add_argument("--trial-steps", type=int, default=90, help="steps per Tune trial")
    p.add_argument("--layers", default="conv2,conv3,bottleneck", help="encoder layers to probe")
    return p.parse_args(argv)


def prepare(argv: list[str] | None = None) -> Work:
    """Parse and check the flags; returns the pipeline to run."""
    args = parse_args(argv)
    small = [f"--{k.replace('_', '-')}" for k in ("steps", "trials", "trial_steps")
             if getattr(args, k) < 1]  # fmt: skip
    if small:
        raise ValueError(f"{', '.join(small)} must be >= 1")
    if is_uri(args.output_root):  # the demo keeps shards and its sqlite store on local disk
        raise ValueError(f"--output-root must be a local folder, got {args.output_root}")
    return lambda: run_all(args)


def run_all(args: argparse.Namespace) -> str:
    """The four stages; returns the probe's MLflow run id."""
    from pipeline.runtime import connect_ray

    t0, root = time.perf_counter(), Path(args.output_root).resolve()
    stage(f"1/4 shards from scikit-learn's digits -> {root / 'shards'}", t0)
    splits = make_digit_shards(root / "shards" / "digits")
    print(connect_ray(num_cpus=2))
    chosen = select_encoders(root, splits, args, time.strftime("%Y%m%d-%H%M%S"), t0)
    probe_run = score(root, splits, chosen, args.layers, t0)
    stage("done", t0)
    pre = chosen.pretrained
    print(f"pretrain run:  {pre.mlflow_run_id}  (checkpoint {pre.checkpoint_path})")
    print(f"tune search:   {chosen.search.parent_run_id}  (best config {chosen.best_config_path})")
    server = pre.tracking_uri.startswith(("http://", "https://"))  # MLFLOW_TRACKING_URI's
    print("see every run: " + (pre.tracking_uri if server else "mlflow ui --host 127.0.0.1 "
          f"--port 5000 --backend-store-uri {pre.tracking_uri}"))  # fmt: skip
    return probe_run


__all__ = ["Selected", "make_digit_shards", "parse_args", "score", "select_encoders"]


def main(argv: list[str] | None = None) -> str:
    """Runs the pipeline, every exception raised; returns the probe's MLflow run id."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-end-to-end` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
