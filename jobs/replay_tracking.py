"""Send what a run's rank 0 could not send to MLflow (a tracking-server outage that outlasted the
end of the run) from its spool, in order and without duplicates.

    python -m jobs.replay_tracking --tracking-uri http://127.0.0.1:5000 \\
        --spool-dir outputs/tracking_spool [--run-id RUN_ID] [--timeout-s 300] [--wait-s 0]

Resuming the run (the same `run.run_name`) does the same thing first; this is for a run that is
finished. Every run is first looked up on the target: a run it does not have (the wrong
--tracking-uri) stops the replay before anything is sent, spools untouched (exit 2). A spool that
a live process holds (the run's rank 0, another replay) is left to it after waiting --wait-s.
Exits 0 when every spool is empty afterwards, 1 otherwise (the rest stays spooled), 2 on a usage
error. Entries the server rejects (HTTP 4xx) land in <run_id>.dead.jsonl beside the spool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.tracking import RunLogger, SpoolBusyError, client
from pipeline.tracking.server import check_tracking_uri
from pipeline.tracking.spool import Spool

EXIT_USAGE = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tracking-uri", required=True, help="the MLflow server the run logs to")
    p.add_argument("--spool-dir", required=True, help="<output_root>/tracking_spool")
    p.add_argument("--run-id", default="", help="one run's spool (default: every spool there)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per run")
    p.add_argument(
        "--wait-s", type=float, default=0.0,
        help="how long to wait for a process holding a run's spool (default: skip it at once)",
    )  # fmt: skip
    return p.parse_args(argv)


def spooled_runs(spool_dir: Path, run_id: str = "") -> list[str]:
    """Run ids with a spool file in `spool_dir` (raises naming the folder when it is missing)."""
    if not spool_dir.is_dir():
        raise FileNotFoundError(f"--spool-dir {spool_dir}: no such folder")
    runs = sorted(p.name.removesuffix(".jsonl") for p in spool_dir.glob("*.jsonl"))
    runs = [r for r in runs if not r.endswith(".dead")]  # dead letters are for people to read
    if run_id:
        if run_id not in runs:
            raise FileNotFoundError(f"--run-id {run_id}: no {run_id}.jsonl in {spool_dir}")
        return [run_id]
    return runs


def missing_runs(uri: str, run_ids: list[str]) -> list[str]:
    """The runs the store at `uri` does not hold as active runs (deleted ones take no logging)."""
    from mlflow.exceptions import MlflowException

    c, missing = client(uri), []
    for run_id in run_ids:
        try:
            if c.get_run(run_id).info.lifecycle_stage != "active":
                missing.append(run_id)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            missing.append(run_id)
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spool_dir = Path(args.spool_dir).resolve()
    runs = spooled_runs(spool_dir, args.run_id)
    check_tracking_uri(args.tracking_uri)  # fail fast: replaying into a dead server does nothing
    missing = missing_runs(args.tracking_uri, runs)
    if missing:
        print(f"replay_tracking: error: {args.tracking_uri} has no run {', '.join(missing)} "
              f"(is it the server these runs logged to?); nothing replayed, {spool_dir} left "
              "untouched", file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_USAGE
    left = 0
    for run_id in runs:
        try:
            logger = RunLogger(args.tracking_uri, run_id, spool_dir=spool_dir,
                               lock_wait_s=args.wait_s)  # fmt: skip
        except SpoolBusyError as e:
            pending = Spool(spool_dir, run_id).pending()
            print(f"[replay] run {run_id}: {pending} entries left to its holder: {e}", flush=True)
            left += pending
            continue
        line = logger.close(args.timeout_s)
        print(f"[replay] run {run_id}: {line}", flush=True)
        left += logger.spool.pending()
    print(f"[replay] {len(runs)} spool(s); {left} entries still unsent", flush=True)
    return 0 if left == 0 else 1


def cli() -> int:
    try:
        return main()
    except FileNotFoundError as e:  # --spool-dir / --run-id name nothing: the user's to fix
        print(f"replay_tracking: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(cli())
