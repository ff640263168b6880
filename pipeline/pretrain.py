"""One pretraining run: preflight, start or join Ray, open (or resume) its MLflow run, log the
resolved config, train with Ray Train, close the run. `jobs.pretrain` and `jobs.end_to_end`
call `run_pretrain`; Tune trials build the same trainer through `pipeline.ray_train`.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass

from pipeline.config import Config, dump_config, flatten, generator_lr, global_batch, to_dict
from pipeline.identity import change_tags, resume_changes
from pipeline.runtime import connect_ray, preflight, resolve_paths
from pipeline.storage import fs_uri
from pipeline.tracking import (
    RunLogger,
    experiment_id,
    log_shards_input,
    start_or_resume_run,
    tracked_run,
)
from pipeline.tracking.server import redact, run_url, tracking_source
from pipeline.worker_wait import watch


@dataclass(frozen=True)
class PretrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint_path: str | None  # a local path, or a URI when run.output_root is one
    metrics: dict
    run_url: str = ""  # the run's page on a server, or the `mlflow ui` command for sqlite


def run_name_for(cfg: Config) -> str:
    """run.run_name, else <experiment>-<YYYYmmdd-HHMMSS>-<6 hex>: two jobs started in the same
    second must not share checkpoints and an MLflow run. Characters a run name may not hold
    (pipeline.config.RUN_NAME) become '-'."""
    if cfg.run.run_name:
        return cfg.run.run_name
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", cfg.run.name).lstrip(".-")[:96] or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def derived_params(cfg: Config) -> dict[str, float]:
    """Values the config implies but does not spell out, logged beside it."""
    return {
        "derived.lr_g": generator_lr(cfg.train, cfg.loss),
        "derived.global_batch": global_batch(cfg),
    }


def run_pretrain(cfg: Config, address: str = "") -> PretrainResult:
    """Preflight, start or join Ray, train, and close the MLflow run; raises on failure."""
    # imports Ray Train: only when training
    from pipeline.ray_train import build_trainer, storage_path, worker_resources

    source = tracking_source(cfg.run)  # before resolve_paths writes the URI into the config
    cfg = resolve_paths(cfg)
    uri = preflight(cfg)
    print(f"[pretrain] MLflow at {redact(uri)} (from {source})", flush=True)
    name = run_name_for(cfg)
    # Before Ray starts and before an MLflow run opens: another config under this name is
    # refused here (ConfigError, exit 2), not found out by the workers.
    changes = resume_changes(cfg, name, storage_path(cfg.run.output_root))
    print(f"[pretrain] {connect_ray(address or cfg.run.address)}", flush=True)
    run_id, resumed = start_or_resume_run(uri, cfg.run.name, name)
    url = run_url(uri, experiment_id(uri, cfg.run.name), run_id)
    logger = RunLogger(uri, run_id)  # synchronous: the server has just answered preflight
    logger.tag("ce.tracking_uri", redact(uri))
    logger.tag("ce.tracking_uri_source", source)
    if changes:  # params keep the values the run started with (immutable): tags say what changed
        for key, value in change_tags(changes).items():
            logger.tag(key, value)
        print(f"[pretrain] config changed on resume: {', '.join(changes)}", flush=True)
    if not resumed:
        logger.params(flatten(to_dict(cfg)) | derived_params(cfg))
        logger.bytes(dump_config(cfg).encode(), "config.yaml")  # the resolved config, once
        log_shards_input(uri, run_id, cfg.data.train_shards, "train")
        if cfg.data.val_shards:
            log_shards_input(uri, run_id, cfg.data.val_shards, "validation")
    print(f"[pretrain] run {name} ({'resumed' if resumed else 'new'}); MLflow run {run_id}: {url}")
    print(f"[pretrain] global batch {global_batch(cfg)} ({cfg.data.batch_size} x "
          f"{max(1, cfg.run.num_workers)} ranks), lr G {generator_lr(cfg.train, cfg.loss):g} / "
          f"D {cfg.train.lr_d:g} (not rescaled with the batch)", flush=True)  # fmt: skip

    wait_s = cfg.run.worker_wait_timeout_s
    trainer = build_trainer(cfg, run_name=name, tracking_uri=uri, mlflow_run_id=run_id,
                            worker_wait_timeout_s=wait_s)  # fmt: skip
    need = worker_resources(cfg)
    with tracked_run(uri, run_id), watch(cfg.run.num_workers, need, wait_s,
                                         resume_hint=f"run.run_name={name}"):  # fmt: skip
        result = trainer.fit()
    ckpt = result.checkpoint
    path = fs_uri(ckpt.filesystem, ckpt.path) if ckpt is not None else None  # s3://... in a bucket
    return PretrainResult(name, run_id, uri, path, dict(result.metrics or {}), url)
