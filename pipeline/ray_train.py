"""Ray Train glue: the per-worker loop and the one function that builds a `TorchTrainer`.

This is the only library module that touches `ray.train`; the training loop itself
(`pipeline.trainer.fit`) knows nothing of Ray and runs unchanged in a plain process. Both the
pretrain job and every Tune trial build their trainer with `build_trainer`, so there is one
training set-up, not two drifting copies.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint, save_encoder
from pipeline.config import Config, from_dict, to_dict
from pipeline.data import build_loader
from pipeline.passes import eval_mode, take_batches
from pipeline.sample_grid import inpainting_grid
from pipeline.tracking import RunLogger
from pipeline.trainer import Trainer, fit, inpaint

CHECKPOINT_FILE = "checkpoint.pt"
ENCODER_ARTIFACT = "encoder/generator.pt"  # evaluation loads runs:/<run_id>/encoder/generator.pt


def storage_path(output_root: str) -> str:
    """Where Ray Train persists checkpoints: absolute, since workers change directory."""
    return str((Path(output_root) / "ray_results").resolve())


def build_trainer(
    cfg: Config,
    *,
    run_name: str,
    tracking_uri: str = "",
    mlflow_run_id: str = "",
    callbacks: Sequence[Any] = (),
    extra_scores: Callable[[Trainer], dict[str, float]] | None = None,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer running `cfg` as DDP over `cfg.run.num_workers` workers.

    `mlflow_run_id` (with `tracking_uri`): rank 0 logs metrics, sample grids and the final
    encoder there. `extra_scores(trainer)` runs on rank 0 at each checkpoint and its values join
    the reported metrics (Tune uses it for a cheap probe score).
    """
    resources = {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if cfg.run.use_gpu else {})
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
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
            callbacks=list(callbacks),
        ),
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, train with `fit`, report checkpoints."""
    cfg: Config = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))

    wrap = _ddp if world > 1 else None
    trainer = Trainer(cfg, ray.train.torch.get_device(), wrap=wrap)
    resumed_from = _restore(trainer)

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        if resumed_from is not None:
            # The restart is visible in the run: a marker metric at the step it continued from.
            logger.metrics({"resumed_from_step": resumed_from}, step=resumed_from)
    if rank == 0:
        _log_resolved(trainer, logger)
    val = _held_out_batches(cfg) if rank == 0 else []

    def loader_for_epoch(epoch: int, start_batch: int):
        return build_loader(
            cfg.data, cfg.mask, urls=cfg.data.train_shards, train=True, rank=rank,
            world_size=world, epoch=epoch, seed=cfg.train.seed, start_batch=start_batch,
        )  # fmt: skip

    def on_log(metrics: dict[str, float]) -> None:
        if logger is not None:
            logger.metrics(_numeric(metrics), step=int(metrics["step"]))

    def on_checkpoint(t: Trainer) -> None:
        scores = _checkpoint_scores(t, val, logger, loop_config.get("extra_scores"))
        _report(t, rank, scores)

    fit(trainer, loader_for_epoch, on_log=on_log, on_checkpoint=on_checkpoint)
    steps = _steps_per_rank(trainer.step, world)
    if logger is not None:
        logger.tag("ce.steps_per_rank", ",".join(map(str, steps)))
        logger.tag("ce.world_size", str(world))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(ENCODER_ARTIFACT).name
            save_encoder(path, trainer.g, cfg)
            logger.file(path, str(Path(ENCODER_ARTIFACT).parent))


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
    return ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"broadcast_buffers": False}
    )


def _restore(trainer: Trainer) -> int | None:
    """Load the latest reported checkpoint of this run (after a worker failure, or a rerun with
    the same run name). Returns the step it continues from, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        trainer.load_state_dict(load_checkpoint(Path(d) / CHECKPOINT_FILE))
    return trainer.step


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
) -> dict[str, float]:
    """Rank 0's scores at a checkpoint (validation, optional extra), also logged to MLflow."""
    scores: dict[str, float] = {}
    if val:
        scores |= t.evaluate(val)
    if extra_scores is not None and (val or logger is not None):
        scores |= extra_scores(t)
    if logger is not None:
        if scores:
            logger.metrics(scores, step=t.step)
        if val and t.step % t.cfg.train.sample_every < t.cfg.train.checkpoint_every:
            logger.png(_sample_grid(t, val[0]), f"samples/step_{t.step:07d}.png")
    return scores


@torch.no_grad()
def _sample_grid(t: Trainer, batch: dict):
    with eval_mode(t.g) as g:
        filled = inpaint(g, {k: _to(v, t.device) for k, v in batch.items()}, t.cfg.model)
    scale = max(1, 96 // t.cfg.data.image_size)
    return inpainting_grid(batch["input"], filled.cpu(), batch["image"], scale=scale)


def _report(t: Trainer, rank: int, scores: dict[str, float]) -> None:
    """ray.train.report is a barrier: every rank calls it once per checkpoint; only rank 0
    hands over a checkpoint (the DDP replicas are identical)."""
    metrics = {"step": t.step, "epoch": t.epoch, "time": time.time(), **scores}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / CHECKPOINT_FILE, t.state_dict())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v
