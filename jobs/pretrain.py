"""Pretrain a context encoder with Ray Train (DDP), tracked in MLflow.

    python -m jobs.pretrain --config jobs/configs/digits.yaml train.max_steps=200
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/cifar10.yaml

Every setting is a config key; overrides are `section.key=value`. Bad keys, bad types, missing
shards and an unreachable tracking server all fail here, before any worker starts. Running again
with the same `run.run_name` resumes that run from its last checkpoint.
"""

from __future__ import annotations

import argparse

from pipeline.config import dump_config, load_config
from pipeline.pretrain import PretrainResult, run_pretrain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML config (defaults: the paper's 128-px setting)")
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> PretrainResult:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), flush=True)
    res = run_pretrain(cfg, address=args.address)
    print(f"[pretrain] done: checkpoint {res.checkpoint_path}")
    print(f"[pretrain] MLflow run {res.mlflow_run_id} in {res.tracking_uri}")
    print(f"[pretrain] encoder: runs:/{res.mlflow_run_id}/encoder/generator.pt")
    print(f"[pretrain] browse: mlflow ui --backend-store-uri {res.tracking_uri}")
    return res


if __name__ == "__main__":
    main()
