"""Send what a run's rank 0 could not send to MLflow (a tracking-server outage that outlasted the
end of the run) from its spool, in order and without duplicates.

    python -m jobs.replay_tracking --tracking-uri http://127.0.0.1:5000 \\
        --spool-dir outputs/tracking_spool [--run-id RUN_ID] [--timeout-s 300]

Resuming the run (the same `run.run_name`) does the same thing first; this is for a run that is
finished. Exits 0 when every spool is empty afterwards, 1 otherwise (the rest stays spooled).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.tracking import RunLogger
from pipeline.tracking_server import check_tracking_uri


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tracking-uri", required=True, help="the MLflow server the run logs to")
    p.add_argument("--spool-dir", required=True, help="<output_root>/tracking_spool")
    p.add_argument("--run-id", default="", help="one run's spool (default: every spool there)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    return p.parse_args(argv)


def spooled_runs(spool_dir: Path, run_id: str = "") -> list[str]:
    """Run ids with a spool file in `spool_dir` (raises naming the folder when it is missing)."""
    if not spool_dir.is_dir():
        raise FileNotFoundError(f"--spool-dir {spool_dir}: no such folder")
    runs = sorted(p.name.removesuffix(".jsonl") for p in spool_dir.glob("*.jsonl"))
    if run_id:
        if run_id not in runs:
            raise FileNotFoundError(f"--run-id {run_id}: no {run_id}.jsonl in {spool_dir}")
        return [run_id]
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spool_dir = Path(args.spool_dir).resolve()
    runs = spooled_runs(spool_dir, args.run_id)
    check_tracking_uri(args.tracking_uri)  # fail fast: replaying into a dead server does nothing
    left = 0
    for run_id in runs:
        logger = RunLogger(args.tracking_uri, run_id, spool_dir=spool_dir)
        line = logger.close(args.timeout_s)
        print(f"[replay] run {run_id}: {line}", flush=True)
        left += logger.spool.pending()
    print(f"[replay] {len(runs)} spool(s); {left} entries still unsent", flush=True)
    return 0 if left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
