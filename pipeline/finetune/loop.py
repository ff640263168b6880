"""Ray Train glue for fine-tuning: the per-worker loop (DDP over `run.num_workers` ranks, the
carve's shards read through pipeline.data's loader, one checkpoint per epoch scored on val) and
the TorchTrainer that runs it. The loop sees the carve's train and val shards only: the test
shards are not in its config.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig, MaskConfig, ModelConfig, from_dict, to_dict
from pipeline.data import build_loader
from pipeline.finetune.model import build_classifier, build_optimizer, lr_at, pad_and_crop
from pipeline.finetune.score import count_correct
from pipeline.finetune.settings import FinetuneConfig
from pipeline.ray_train import RAY_TRAIN_CONSOLE_LOG_LEVEL, storage_path
from pipeline.tracking import RunLogger, spool_dir

MODEL_FILE = "model.pt"  # in each epoch's checkpoint: {"model", "optimizer", "epoch"}
SCORE = "val_top1"  # what the choice is made on
# What Ray keeps checkpoints by: val top-1 with the earliest of equal epochs ahead (1e-6 a
# step, far below one image's 100 / n), so the checkpoints kept always include the choice.
RANK = "val_rank"


def loader_config(cfg: FinetuneConfig) -> DataConfig:
    """The loader's settings: no scale jitter (the crop is the padding's), flips as asked, and
    a shuffle window as large as a rank's share of a 10 %-of-CIFAR carve (raw bytes only)."""
    d = cfg.data
    return DataConfig(image_size=d.image_size, resize=0, batch_size=d.batch_size,
                      shuffle_buffer=4096, flip=d.flip)  # fmt: skip


def build_finetune_trainer(
    cfg: FinetuneConfig,
    *,
    run_name: str,
    shards: dict[str, str],
    encoder_state: dict[str, torch.Tensor],
    model: ModelConfig,
    num_classes: int,
    tracking_uri: str,
    mlflow_run_id: str,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer fine-tuning `encoder_state` (architecture `model`) on shards["train"],
    checkpointing every epoch with its val top-1 (shards["val"]); Ray keeps the best two by
    RANK (and the latest)."""
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "model": to_dict(model),
            "shards": dict(shards),
            "encoder_state": encoder_state,
            "num_classes": num_classes,
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
        },  # fmt: skip
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker}
            | ({"GPU": 1} if cfg.run.use_gpu else {}),
        ),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg.run.output_root),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=RANK, checkpoint_score_order="max"
            ),
            logging_config=ray.train.LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LOG_LEVEL),
        ),
    )


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Every rank: build the classifier, restore the newest checkpoint if Ray offers one, then
    for each epoch train on this rank's share of the carve, score val on all ranks (counts
    summed) and report; rank 0 hands over the checkpoint and logs to MLflow."""
    cfg: FinetuneConfig = from_dict(loop["config"], FinetuneConfig)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    torch.manual_seed(cfg.seed)  # the same head on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    model_cfg = from_dict(loop["model"], ModelConfig)
    net = build_classifier(model_cfg, loop["encoder_state"], loop["num_classes"]).to(device)
    opt = build_optimizer(net, cfg.optim)
    start = _restore(net, opt)
    ddp = ray.train.torch.prepare_model(net, move_to_device=False) if world > 1 else net
    logger = None
    if rank == 0 and loop["mlflow_run_id"]:
        logger = RunLogger(loop["tracking_uri"], loop["mlflow_run_id"],
                           spool_dir=spool_dir(cfg.run.output_root))  # fmt: skip
    try:
        for epoch in range(start, cfg.optim.epochs):
            stats = _train_epoch(ddp, opt, cfg, loop["shards"]["train"], epoch, rank, world)
            cpu0 = time.process_time()
            stats[SCORE] = _val_top1(net, cfg, loop["shards"]["val"], rank, world, device)
            spent = torch.tensor([time.process_time() - cpu0], dtype=torch.float64)
            stats["val_cpu_s"] = _summed(spent).item()
            if rank == 0:
                print(_epoch_line(epoch, cfg.optim.epochs, stats), flush=True)
            if logger is not None:
                logger.metrics(stats, step=epoch + 1)
            _report(net, opt, epoch, stats, rank)
    finally:
        if logger is not None:
            print(logger.close(cfg.run.tracking_flush_timeout_s), flush=True)


def _train_epoch(model, opt, cfg: FinetuneConfig, urls: str, epoch: int, rank: int,
                 world: int) -> dict[str, float]:  # fmt: skip
    """One epoch of this rank's batches; returns the epoch's mean loss, top-1 and speed over
    all ranks (summed across them)."""
    loader = build_loader(loader_config(cfg), MaskConfig(), urls=urls, train=True, rank=rank,
                          world_size=world, epoch=epoch, seed=cfg.seed)  # fmt: skip
    steps, warmup = len(loader), round(cfg.optim.warmup_epochs * len(loader))
    total = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
    device = next(model.parameters()).device
    model.train()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i, batch in enumerate(loader):
        lr = lr_at(epoch * steps + i, cfg.optim.epochs * steps, warmup, cfg.optim.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        valid = batch["valid"].to(device)
        x = pad_and_crop(batch["image"], cfg.data.pad, gen).to(device)
        y = batch["label"].to(device)
        logits = model(x)
        per = F.cross_entropy(logits, y, reduction="none") * valid
        loss = per.sum() / valid.sum().clamp(min=1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite fine-tune loss {loss.item()} at epoch {epoch}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += torch.tensor([per.sum().item(), ((logits.argmax(1) == y) & valid).sum().item(),
                               valid.sum().item()], dtype=torch.float64)  # fmt: skip
    seconds = time.perf_counter() - t0
    # CPU seconds (decoding included: it runs in this process), summed over ranks: the budget's
    # unit, and steady where wall time depends on what else shares the machine.
    cpu = torch.tensor([time.process_time() - cpu0], dtype=torch.float64)
    total, cpu = _summed(total), _summed(cpu)
    return {"train_loss": total[0].item() / total[2].item(),
            "train_top1": 100.0 * total[1].item() / total[2].item(), "lr": lr,
            "epoch_s": seconds, "img_per_s": total[2].item() / seconds,
            "train_cpu_s": cpu.item(), "img_per_cpu_s": total[2].item() / cpu.item()}  # fmt: skip


def _val_top1(net, cfg: FinetuneConfig, urls: str, rank: int, world: int, device) -> float:
    """Top-1 (percent) on the val carve: each rank scores its share, the counts are summed."""
    loader = build_loader(loader_config(cfg), MaskConfig(), urls=urls, train=False, rank=rank,
                          world_size=world)  # fmt: skip
    correct, n = count_correct(net, loader, device)
    net.train()
    counts = _summed(torch.tensor([correct, n], dtype=torch.float64))
    return 100.0 * counts[0].item() / counts[1].item()


def _summed(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t


def _epoch_line(epoch: int, epochs: int, s: dict[str, float]) -> str:
    return (f"[finetune] epoch {epoch + 1}/{epochs} | loss {s['train_loss']:.3f} "
            f"train {s['train_top1']:.1f}% val {s[SCORE]:.2f}% | lr {s['lr']:.4f} | "
            f"{s['img_per_s']:.0f} img/s, {s['epoch_s']:.1f}s, "
            f"{s['train_cpu_s']:.0f} CPU-s")  # fmt: skip


def _restore(net, opt) -> int:
    """The epoch to start from: 0, or the one after Ray's offered checkpoint (a restarted
    worker group, or a rerun of the same run name)."""
    offered = ray.train.get_checkpoint()
    if offered is None:
        return 0
    with offered.as_directory() as d:
        state = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1


def _report(net, opt, epoch: int, stats: dict[str, float], rank: int) -> None:
    """A barrier: every rank reports each epoch; rank 0 hands over the checkpoint."""
    metrics = {"epoch": epoch + 1, **stats, RANK: stats[SCORE] - 1e-6 * (epoch + 1)}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
        torch.save(state, Path(d) / MODEL_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
