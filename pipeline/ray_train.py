"""Ray Train glue: the per-worker loop and the one function that builds a `TorchTrainer`.

This is the only library module that touches `ray.train`; the training loop itself
(`pipeline.trainer.fit`) knows nothing of Ray and runs unchanged in a plain process. Both the
pretrain job and every Tune trial build their trainer with `build_trainer`, so there is one
training set-up, not two drifting copies.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipeline.checkpoint import (
    CHECKPOINT_FILE,
    choose_checkpoint,
    fetch_complete,
    load_checkpoint,
    save_checkpoint,
    save_encoder,
    set_aside_unreadable_snapshot,
    upload_checkpoint_dir,
    write_manifest,
)
from pipeline.config import Config, from_dict, to_dict
from pipeline.data import build_loader
from pipeline.data.ray_data import build_dataset, epoch_batches
from pipeline.mlflow_encoder import log_encoder_model
from pipeline.node_metrics import NodeSampler, gather_node_metrics
from pipeline.passes import eval_mode, take_batches
from pipeline.progress import ProgressLog, checkpoint_line, emit
from pipeline.retry import RetryPolicy
from pipeline.sample_grid import inpainting_grid
from pipeline.storage import absolute, join
from pipeline.tracking import RunLogger, spool_dir
from pipeline.trainer import Trainer, fit, inpaint

ENCODER_ARTIFACT = "encoder/generator.pt"  # evaluation loads runs:/<run_id>/encoder/generator.pt
# Ray Train's INFO notices (resource requests, process group set-up, "Reporting training
# result ...") crowd out rank 0's [train] progress lines on the console; they still go to the
# session's logs/train/ray-train-sys-*.log files at every level.
RAY_TRAIN_CONSOLE_LOG_LEVEL = "WARNING"


def storage_path(output_root: str) -> str:
    """Where Ray Train persists checkpoints: <output_root>/ray_results, an absolute local path
    (workers change directory) or a URI handed to Ray as it is (pyarrow opens s3:// gs://)."""
    return join(absolute(output_root), "ray_results")


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves."""
    return {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if cfg.run.use_gpu else {})


def build_trainer(
    cfg: Config,
    *,
    run_name: str,
    tracking_uri: str = "",
    mlflow_run_id: str = "",
    callbacks: Sequence[Any] = (),
    extra_scores: Callable[[Trainer], dict[str, float]] | None = None,
    worker_wait_timeout_s: float = 0.0,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer running `cfg` as DDP over `cfg.run.num_workers` workers.

    `mlflow_run_id` (with `tracking_uri`): rank 0 logs metrics, sample grids and the final
    encoder there. `extra_scores(trainer)` runs on rank 0 at each checkpoint and its values join
    the reported metrics (Tune uses it for a cheap probe score). `worker_wait_timeout_s` > 0:
    the run ends once its workers could not be placed for that long (with
    `pipeline.worker_wait.watch` around `fit`); 0 keeps Ray Train's retry-forever, which Tune
    trials need (they queue for CPUs while other trials run).
    """
    resources = worker_resources(cfg)
    _set_aside_unreadable_snapshot(storage_path(cfg.run.output_root), run_name)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "extra_scores": extra_scores,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg.run.output_root),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures,
                # a start that timed out is a controller failure: 0 = end the run on the first
                controller_failure_limit=0 if worker_wait_timeout_s > 0 else -1,
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LOG_LEVEL),
        ),
        **_ray_data_inputs(cfg),
    )


def _ray_data_inputs(cfg: Config) -> dict[str, Any]:
    """TorchTrainer's `datasets` / `dataset_config` for data.input=ray_data (none otherwise):
    the train Dataset, split across the ranks by Ray Train (streaming_split, equal=True)."""
    if cfg.data.input != "ray_data":
        return {}
    ds = build_dataset(cfg.data, cfg.mask, urls=cfg.data.train_shards, seed=cfg.train.seed)
    return {"datasets": {"train": ds}, "dataset_config": ray.train.DataConfig(["train"])}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, train with `fit`, report checkpoints."""
    cfg: Config = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))

    wrap = _ddp if world > 1 else None
    trainer = Trainer(cfg, ray.train.torch.get_device(), wrap=wrap)
    resumed_from = _restore(trainer, rank)

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        # Asynchronous: a step never waits on the tracking server, and an outage is spooled
        # under the output root (a resumed rank 0 sends that spool first).
        logger = RunLogger(
            loop_config["tracking_uri"], loop_config["mlflow_run_id"],
            spool_dir=spool_dir(cfg.run.output_root),
        )  # fmt: skip
        logger.system_metrics(cfg.run.system_metrics_every_s)
        if resumed_from is not None:
            # The restart is visible in the run: a marker metric at the step it continued from.
            logger.metrics({"resumed_from_step": resumed_from}, step=resumed_from)
    if rank == 0:
        _log_resolved(trainer, logger)
    _report_nodes(rank, world, logger)
    # After a restart, rank 0 replays the steps between the checkpoint and the failure with
    # bit-identical values (exact resume); MLflow already holds those, so they are not re-sent.
    fresh = _Fresh(_logged_steps(logger) if resumed_from is not None else {})
    val = _held_out_batches(cfg) if rank == 0 else []
    progress = ProgressLog(cfg.train.max_steps, trainer.step, world, cfg.data.batch_size)
    if rank == 0:
        emit(progress.start())

    def loader_for_epoch(epoch: int, start_batch: int):
        if cfg.data.input == "ray_data":
            return epoch_batches(
                ray.train.get_dataset_shard("train"), cfg.data, cfg.mask,
                urls=cfg.data.train_shards, rank=rank, world_size=world, epoch=epoch,
                seed=cfg.train.seed, start_batch=start_batch,
            )  # fmt: skip
        return build_loader(
            cfg.data, cfg.mask, urls=cfg.data.train_shards, train=True, rank=rank,
            world_size=world, epoch=epoch, seed=cfg.train.seed, start_batch=start_batch,
        )  # fmt: skip

    # Every node's system metrics, gathered to rank 0 (pipeline.node_metrics: only rank 0 logs).
    # The same decision on every rank: the gather in on_log is a collective.
    every_s = cfg.run.system_metrics_every_s
    nodes = world > 1 and every_s > 0 and bool(loop_config.get("mlflow_run_id"))
    sampler = NodeSampler(every_s) if nodes and ctx.get_local_rank() == 0 else None

    def on_log(metrics: dict[str, float]) -> None:
        if rank == 0:
            emit(progress.line(metrics))
        system = gather_node_metrics(sampler, f"node{ctx.get_node_rank()}") if nodes else {}
        if logger is not None:
            step = int(metrics["step"])
            if new := fresh.only(_numeric(metrics) | system, step):
                logger.metrics(new, step=step)

    def on_checkpoint(t: Trainer) -> None:
        scores = _checkpoint_scores(t, val, logger, loop_config.get("extra_scores"), fresh)
        if rank == 0:
            emit(checkpoint_line(t.step, scores))
        _report(t, rank, scores, _upload_policy(cfg))

    try:
        fit(trainer, loader_for_epoch, on_log=on_log, on_checkpoint=on_checkpoint)
        steps = _steps_per_rank(trainer.step, world)
        if rank == 0:
            emit(progress.end(trainer.step))
        if logger is not None:
            logger.tag("ce.steps_per_rank", ",".join(map(str, steps)))
            logger.tag("ce.world_size", str(world))
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / Path(ENCODER_ARTIFACT).name
                save_encoder(path, trainer.g, cfg)
                logger.file(path, str(Path(ENCODER_ARTIFACT).parent))
            _log_encoder_model(trainer, cfg, loop_config)
    finally:
        if sampler is not None:
            sampler.stop()
        if logger is not None:  # bounded: what is still unsent stays in the spool
            print(logger.close(cfg.run.tracking_flush_timeout_s), flush=True)


def _log_encoder_model(trainer: Trainer, cfg: Config, loop_config: dict[str, Any]) -> None:
    """The same weights as a loadable MLflow Model (encoder only; generator.pt inpaints).
    A synchronous MLflow call: when the server is down at the very end it is skipped with a
    warning, never failing a finished run (generator.pt is already queued in the spool)."""
    try:
        log_encoder_model(trainer.g.state_dict(), cfg, loop_config["tracking_uri"],
                          loop_config["mlflow_run_id"], cfg.run.register_model)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - tracking must never fail a finished training run
        warnings.warn(
            f"could not log the encoder as an MLflow Model ({type(e).__name__}: {e}); the "
            f"run's encoder/generator.pt holds the same weights",
            stacklevel=1,
        )


def _log_resolved(trainer: Trainer, logger: RunLogger | None) -> None:
    """What "auto" (or an explicit value) became on this machine: printed, and tagged on the
    run (tags, not params: a resumed run may land on other hardware and resolve differently)."""
    r = trainer.resolved
    print(
        f"[pretrain] precision {r.precision}, channels_last {r.channels_last} ({r.reason})",
        flush=True,
    )
    if logger is not None:
        for key, value in r.as_tags().items():
            logger.tag(key, value)


def _report_nodes(rank: int, world: int, logger: RunLogger | None) -> None:
    """Which Ray node each rank runs on: every rank says so in its startup line, and rank 0
    tags the run `ce.rank_nodes` (node ids in rank order; rewritten at each restart)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    ip = ray.util.get_node_ip_address()
    emit(f"[pretrain] rank {rank}/{world} on node {node[:12]} ({ip})")
    nodes = [node]
    if world > 1:
        nodes = [""] * world
        torch.distributed.all_gather_object(nodes, node)
    if logger is not None:
        logger.tag("ce.rank_nodes", ",".join(nodes))


class _Fresh:
    """Drops (key, step) pairs MLflow already holds: `logged` maps a metric key to the highest
    step logged for it before a restart."""

    def __init__(self, logged: dict[str, int]) -> None:
        self.logged = logged

    def only(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}


# Not deduplicated: system/* are samples of the machine taken every few seconds, labelled with
# the current step (new values at an old step), and the marker says each restart happened.
UNDEDUPLICATED = ("system/", "resumed_from_step")


def _logged_steps(logger: RunLogger | None) -> dict[str, int]:
    """The highest step of each training metric the run holds (rank 0, at a restart). Entries
    still in a tracking spool from an outage are not seen here; if MLflow cannot be asked,
    nothing is filtered (a replayed step then appears twice, with identical values)."""
    if logger is None:
        return {}
    from pipeline.tracking import client

    try:
        c = client(logger.uri)
        keys = [k for k in c.get_run(logger.run_id).data.metrics
                if not k.startswith(UNDEDUPLICATED)]  # fmt: skip
        return {k: max(m.step for m in c.get_metric_history(logger.run_id, k)) for k in keys}
    except Exception as e:  # noqa: BLE001 - tracking must never fail a training run
        warnings.warn(f"could not read the run's logged steps ({type(e).__name__}: {e}); steps "
                      "replayed since the checkpoint are logged again", stacklevel=1)  # fmt: skip
        return {}


def _steps_per_rank(step: int, world: int) -> list[int]:
    """Every rank must end on the same step (else DDP would have hung); check it, loudly."""
    if world == 1:
        return [step]
    steps: list[int] = [0] * world
    torch.distributed.all_gather_object(steps, step)
    if len(set(steps)) != 1:
        raise RuntimeError(f"ranks finished on different steps: {steps}")
    return steps


def _ddp(module: torch.nn.Module) -> torch.nn.Module:
    # broadcast_buffers=False: BN running stats are only used in eval, and a
    # per-forward buffer broadcast from rank 0 would add a collective to every D call.
    with warnings.catch_warnings():
        # Ray 2.60 warns that broadcast_buffers is deprecated for forward_sync_buffers, whose
        # False still syncs at init; the behaviour asked for here is unchanged, so say it once
        # here instead of once per worker in every job log.
        warnings.filterwarnings(
            "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
        )
        return ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"broadcast_buffers": False}
        )


def _restore(trainer: Trainer, rank: int) -> int | None:
    """Load the newest complete checkpoint of this run (after a worker failure, or a rerun with
    the same run name). Returns the step it continues from, or None on a fresh start.

    Ray offers the latest checkpoint it registered; rank 0 also looks at every checkpoint folder
    in the run's storage, skips incomplete ones (pipeline.checkpoint.choose_checkpoint) and tells
    the other ranks which one it chose, so all ranks load the same step."""
    offered = ray.train.get_checkpoint()
    storage = _storage()
    with tempfile.TemporaryDirectory() as work:
        if storage is None:  # local mode (run.num_workers=0): no run storage, only Ray's offer
            if offered is None:
                return None
            with offered.as_directory() as d:
                trainer.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE))
            return trainer.step
        fs = storage.storage_filesystem
        policy = _upload_policy(trainer.cfg)  # resume reads are retried as uploads are
        chosen = None
        if rank == 0:
            offer = offered.path if offered is not None else None
            chosen = choose_checkpoint(fs, storage.experiment_fs_path, offer, work, policy)
        path = _from_rank0(chosen.path if chosen else None)
        if path is None:
            return None
        local = chosen.local if chosen else fetch_complete(fs, path, work, policy)
        trainer.load_state_dict(load_checkpoint(local / CHECKPOINT_FILE))
    return trainer.step


def _from_rank0(value: str | None) -> str | None:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _storage():
    """Ray Train's StorageContext (filesystem + run folder), or None in local mode."""
    try:
        return ray.train.get_context().get_storage()
    except NotImplementedError:
        return None


def _set_aside_unreadable_snapshot(storage: str, run_name: str) -> None:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    set_aside_unreadable_snapshot(fs, f"{root.rstrip('/')}/{run_name}")


def _upload_policy(cfg: Config) -> RetryPolicy:
    return RetryPolicy(retries=cfg.run.upload_retries, backoff_s=cfg.run.upload_backoff_s)


def _held_out_batches(cfg: Config) -> list[dict]:
    """A fixed, decoded-once set of held-out batches for validation scores and sample grids."""
    if not cfg.data.val_shards or cfg.train.eval_batches <= 0:
        return []
    loader = build_loader(
        cfg.data, cfg.mask, urls=cfg.data.val_shards, train=False, seed=cfg.train.seed
    )
    return list(take_batches(loader, n_batches=cfg.train.eval_batches))


def _checkpoint_scores(
    t: Trainer,
    val: list[dict],
    logger: RunLogger | None,
    extra_scores: Callable[[Trainer], dict[str, float]] | None,
    fresh: _Fresh,
) -> dict[str, float]:
    """Rank 0's scores at a checkpoint (validation, optional extra), also logged to MLflow
    (what a run that was restarted had logged at this step already is not logged again)."""
    scores: dict[str, float] = {}
    if val:
        scores |= t.evaluate(val)
    if extra_scores is not None and (val or logger is not None):
        scores |= extra_scores(t)
    new = fresh.only(scores, t.step)
    if logger is not None and (new or not scores):
        if new:
            logger.metrics(new, step=t.step)
        if val and t.step % t.cfg.train.sample_every < t.cfg.train.checkpoint_every:
            grid = _sample_grid(t, val[0])
            logger.png(grid, f"samples/step_{t.step:07d}.png")
            logger.image(grid, key="samples", step=t.step)  # MLflow's step slider
    return scores


@torch.no_grad()
def _sample_grid(t: Trainer, batch: dict):
    with eval_mode(t.g) as g:
        filled = inpaint(g, {k: _to(v, t.device) for k, v in batch.items()}, t.cfg.model)
    scale = max(1, 96 // t.cfg.data.image_size)
    return inpainting_grid(batch["input"], filled.cpu(), batch["image"], scale=scale)


def _report(t: Trainer, rank: int, scores: dict[str, float], upload: RetryPolicy) -> None:
    """ray.train.report is a barrier: every rank calls it once per checkpoint; only rank 0
    hands over a checkpoint (the DDP replicas are identical). The folder carries a manifest,
    and we upload it ourselves (manifest last, transient errors retried) rather than let Ray
    copy the folder in no particular order."""
    metrics = {"step": t.step, "epoch": t.epoch, "time": time.time(), **scores}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / CHECKPOINT_FILE, t.state_dict())
        write_manifest(d, step=t.step, config=to_dict(t.cfg))  # + its fingerprint
        upload_fn = _uploader(t.step, upload) if _storage() is not None else None
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_upload_fn=upload_fn,
        )


def _uploader(step: int, policy: RetryPolicy):
    """Ray's checkpoint_upload_fn: copy into the run folder Ray chose, return where it is."""

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        storage = ray.train.get_context().get_storage()
        dest = storage.build_checkpoint_path_from_name(dir_name)
        upload_checkpoint_dir(checkpoint.path, storage.storage_filesystem, dest, policy, step)
        return ray.train.Checkpoint(path=dest, filesystem=storage.storage_filesystem)

    return upload


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v
