"""Pretrain a context encoder with Ray Train (DDP), tracked in MLflow.

    python -m jobs.pretrain --config jobs/configs/digits.yaml train.max_steps=200
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/cifar10.yaml

Every setting is a config key; overrides are `section.key=value`. Bad keys, bad types, missing
shards and an unreachable tracking server all fail here, before any worker starts. Running again
with the same `run.run_name` resumes that run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from pipeline.config import (
    Config,
    dump_config,
    flatten,
    generator_lr,
    global_batch,
    load_config,
    to_dict,
)
from pipeline.runtime import preflight, resolve_paths
from pipeline.tracking import RunLogger, start_or_resume_run, tracked_run


@dataclass(frozen=True)
class PretrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str | None
    metrics: dict


def run_name_for(cfg: Config) -> str:
    return cfg.run.run_name or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def derived_params(cfg: Config) -> dict[str, float]:
    """Values the config implies but does not spell out, logged beside it."""
    return {
        "derived.lr_g": generator_lr(cfg.train, cfg.loss),
        "derived.global_batch": global_batch(cfg),
    }


def run_pretrain(cfg: Config, address: str = "") -> PretrainResult:
    """Preflight, start or join Ray, train, and close the MLflow run; raises on failure."""
    from pipeline.ray_train import build_trainer
    from pipeline.runtime import connect_ray

    cfg = resolve_paths(cfg)
    uri = preflight(cfg)
    print(f"[pretrain] {connect_ray(address or cfg.run.address)}; MLflow at {uri}", flush=True)
    name = run_name_for(cfg)
    run_id, resumed = start_or_resume_run(uri, cfg.run.name, name)
    if not resumed:
        logger = RunLogger(uri, run_id)
        logger.params(flatten(to_dict(cfg)) | derived_params(cfg))
        logger.bytes(dump_config(cfg).encode(), "config.yaml")  # the resolved config, once
    print(f"[pretrain] run {name} ({'resumed' if resumed else 'new'}); MLflow run {run_id}")
    print(f"[pretrain] global batch {global_batch(cfg)} ({cfg.data.batch_size} x "
          f"{max(1, cfg.run.num_workers)} ranks), lr G {generator_lr(cfg.train, cfg.loss):g} / "
          f"D {cfg.train.lr_d:g} (not rescaled with the batch)", flush=True)  # fmt: skip

    trainer = build_trainer(cfg, run_name=name, tracking_uri=uri, mlflow_run_id=run_id)
    with tracked_run(uri, run_id):
        result = trainer.fit()
    path = result.checkpoint.path if result.checkpoint is not None else None
    return PretrainResult(name, run_id, uri, path, dict(result.metrics or {}))


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
