"""One fine-tune run, in two stages with a hard line between them:

    select(cfg, encoder, run)      carve the labelled and val images from the training pool,
                                   fine-tune on Ray Train, choose the epoch with the best val
                                   top-1. Never reads data.test_shards.
    score_test(cfg, chosen, run)   the chosen weights score the test shards once: top-1 with
                                   Wilson's 95 % interval; the result row is written.

`run_finetune` opens the MLflow run, runs both inside it and closes it (`tracked_run`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import ModelConfig, flatten, to_dict, tracking_uri
from pipeline.data import build_loader
from pipeline.finetune.carve import Carve, carve
from pipeline.finetune.model import build_classifier
from pipeline.finetune.score import count_correct, wilson_interval
from pipeline.finetune.settings import FinetuneConfig
from pipeline.runtime import _absolute_urls
from pipeline.storage import absolute, local_root
from pipeline.tracking import RunLogger, check_tracking, start_or_resume_run, tracked_run

# The benchmark's row (ce-benchmark ingests it with protocol `finetune`); accuracies in percent.
ROW_COLUMNS = ("encoder", "kind", "protocol", "label_fraction", "seed", "layer", "chosen_on_val",
               "val_top1", "test_top1", "test_ci_low", "test_ci_high", "test_n")  # fmt: skip


@dataclass(frozen=True)
class EncoderInit:
    """The weights fine-tuning starts from: an encoder's stages (`Generator.encoder` keys, no
    prefix) and its architecture. kind: context_encoder or random_init."""

    name: str
    kind: str
    source: str  # the URI it was loaded from, or random_init:<seed>
    model: ModelConfig
    state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrackedRun:
    uri: str
    run_id: str
    run_name: str
    resumed: bool


@dataclass(frozen=True)
class Selected:
    """What `select` chose on val, for `score_test`."""

    carve: Carve
    epoch: int  # 1-based
    val_top1: float
    model_state: dict[str, torch.Tensor]  # the classifier at that epoch


@dataclass(frozen=True)
class FinetuneResult:
    row: dict
    row_csv: Path
    row_json: Path
    run_id: str
    tracking_uri: str


def resolve_finetune_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """Shard patterns and the output root made absolute (Ray workers run elsewhere)."""
    data = dataclasses.replace(cfg.data, train_shards=_absolute_urls(cfg.data.train_shards),
                               test_shards=_absolute_urls(cfg.data.test_shards))  # fmt: skip
    run = dataclasses.replace(cfg.run, output_root=absolute(cfg.run.output_root))
    return dataclasses.replace(cfg, data=data, run=run)


def open_run(cfg: FinetuneConfig, enc: EncoderInit) -> TrackedRun:
    """The MLflow run of this fine-tune (resumed by run name), its config logged once."""
    uri = tracking_uri(cfg.run)
    check_tracking(uri)
    name = cfg.run.run_name or f"{cfg.run.name}-{enc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, resumed = start_or_resume_run(uri, cfg.run.name, name, tags={"ce.kind": "finetune"})
    if not resumed:
        RunLogger(uri, run_id).params(
            flatten(to_dict(cfg))
            | {"encoder.name": enc.name, "encoder.kind": enc.kind, "encoder.source": enc.source}
            | {f"encoder.model.{k}": v for k, v in to_dict(enc.model).items()}
        )
    return TrackedRun(uri, run_id, name, resumed)


def select(cfg: FinetuneConfig, enc: EncoderInit, run: TrackedRun, address: str = "") -> Selected:
    """Carve, fine-tune on Ray Train, and choose the epoch with the best val top-1 (the earliest
    of equals). Reads the training pool only."""
    from pipeline.finetune.loop import MODEL_FILE, RANK, SCORE, build_finetune_trainer
    from pipeline.runtime import connect_ray

    chosen_images = carve(cfg.data, str(local_root(cfg.run.output_root)))
    print(f"[finetune] carve {chosen_images.folder.name}: {len(chosen_images.train_keys)} "
          f"labelled, {len(chosen_images.val_keys)} val images", flush=True)  # fmt: skip
    print(f"[finetune] {connect_ray(address or cfg.run.address)}", flush=True)
    trainer = build_finetune_trainer(
        cfg, run_name=run.run_name, encoder_state=enc.state, model=enc.model,
        shards={"train": chosen_images.shards("train"), "val": chosen_images.shards("val")},
        num_classes=chosen_images.num_classes, tracking_uri=run.uri, mlflow_run_id=run.run_id,
    )  # fmt: skip
    result = trainer.fit()
    kept = result.best_checkpoints or []
    if not kept:
        raise RuntimeError(f"fine-tune run {run.run_name} reported no checkpoint")
    ckpt, metrics = max(kept, key=lambda cm: cm[1][RANK])  # the earliest of the best
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
    return Selected(chosen_images, int(metrics["epoch"]), float(metrics[SCORE]), state["model"])


def score_test(
    cfg: FinetuneConfig, enc: EncoderInit, chosen: Selected, run: TrackedRun
) -> FinetuneResult:
    """The chosen weights on the test shards, once: top-1 and its Wilson interval, logged, and
    the result row written as result.csv / result.json under <output_root>/finetune/<run>/."""
    from pipeline.config import MaskConfig
    from pipeline.finetune.loop import loader_config

    net = build_classifier(enc.model, _encoder_part(chosen.model_state), chosen.carve.num_classes)
    net.load_state_dict(chosen.model_state)
    loader = build_loader(loader_config(cfg), MaskConfig(), urls=cfg.data.test_shards, train=False)
    correct, total = count_correct(net, loader)
    low, high = wilson_interval(correct, total)
    row = {
        "encoder": enc.name, "kind": enc.kind, "protocol": "finetune",
        "label_fraction": cfg.data.label_fraction, "seed": cfg.seed, "layer": "all",
        "chosen_on_val": True, "val_top1": round(chosen.val_top1, 4),
        "test_top1": round(100.0 * correct / total, 4),
        "test_ci_low": round(100.0 * low, 4), "test_ci_high": round(100.0 * high, 4),
        "test_n": total,  # ce-benchmark's interval for the gap needs the count
    }  # fmt: skip
    folder = local_root(cfg.run.output_root) / "finetune" / run.run_name
    folder.mkdir(parents=True, exist_ok=True)
    row_csv, row_json = folder / "result.csv", folder / "result.json"
    with row_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        writer.writeheader()
        writer.writerow(row)
    row_json.write_text(json.dumps(row, indent=1) + "\n")
    logger = RunLogger(run.uri, run.run_id)
    final = {"chosen_epoch": chosen.epoch, "chosen_val_top1": chosen.val_top1, "test_images": total}
    final |= {k: row[k] for k in ("test_top1", "test_ci_low", "test_ci_high")}
    logger.metrics(final, step=chosen.epoch)
    logger.file(row_csv)
    logger.file(row_json)
    return FinetuneResult(row, row_csv, row_json, run.run_id, run.uri)


def _encoder_part(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder stages' entries of a classifier state dict, without their prefix."""
    return {k[len("encoder.") :]: v for k, v in model_state.items() if k.startswith("encoder.")}


def run_finetune(cfg: FinetuneConfig, enc: EncoderInit, address: str = "") -> FinetuneResult:
    """Both stages inside one MLflow run, closed FINISHED / FAILED / KILLED."""
    cfg = resolve_finetune_paths(cfg)
    run = open_run(cfg, enc)
    print(f"[finetune] run {run.run_name} ({'resumed' if run.resumed else 'new'}); MLflow run "
          f"{run.run_id} in {run.uri}", flush=True)  # fmt: skip
    with tracked_run(run.uri, run.run_id):
        chosen = select(cfg, enc, run, address)
        print(f"[finetune] chosen on val: epoch {chosen.epoch}, val top-1 "
              f"{chosen.val_top1:.2f}%", flush=True)  # fmt: skip
        return score_test(cfg, enc, chosen, run)
