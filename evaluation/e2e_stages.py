"""The end-to-end demo's two stages (jobs.end_to_end): choose on val, then score.

    select_encoders   pretrain, then a Tune search; every choice on the val split, never test
    score             the linear probe of the chosen encoders, the only reader of test

The chosen trial is the one best_config.yaml names (ranked by its final score,
pipeline.search.driver.final_ranking) and its final encoder is the one probed.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.pretrain import PretrainResult
    from pipeline.search import SearchResult

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def stage(msg: str, t0: float) -> None:
    print(f"\n=== [{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Splits:
    """Shard patterns of the train / val / test splits."""

    train: str
    val: str
    test: str


@dataclass(frozen=True)
class Selected:
    """What the selection stage chose (on val) for the scoring stage."""

    pretrained: PretrainResult
    search: SearchResult
    tune_best_uri: str  # the final encoder of best_config.yaml's trial
    best_config_path: Path


def _budget(root: Path, splits: Splits, steps: int) -> list[str]:
    """Overrides for train / val shards, output root and steps: never the test shards."""
    return [f"data.train_shards={splits.train}", f"data.val_shards={splits.val}",
            f"run.output_root={root}", f"train.max_steps={steps}",
            f"train.checkpoint_every={max(1, steps // 3)}"]  # fmt: skip


def select_encoders(
    root: Path, splits: Splits, args: argparse.Namespace, stamp: str, t0: float
) -> Selected:
    """Steps 2-3: pretrain, then search, choosing on the val split. Never reads splits.test."""
    from evaluation.knn_score import KnnScore
    from pipeline.config import apply_overrides, load_config
    from pipeline.pretrain import run_pretrain
    from pipeline.search import load_settings, run_search
    from pipeline.search.trial import best_trial_encoder

    stage(f"2/4 pretraining with Ray Train, 2 workers, {args.steps} steps", t0)
    extra = [f"train.sample_every={max(1, args.steps // 3)}", f"run.run_name=digits-{stamp}"]
    pre = run_pretrain(
        load_config(CONFIGS / "digits.yaml", _budget(root, splits, args.steps) + extra)
    )
    stage(f"3/4 Ray Tune search, {args.trials} trials of {args.trial_steps} steps", t0)
    settings, base = load_settings(
        CONFIGS / "tune_digits.yaml", [f"num_samples={args.trials}", f"name=tune-digits-{stamp}"]
    )
    base = apply_overrides(base, _budget(root, splits, args.trial_steps))
    found = run_search(settings, base, make_score=KnnScore)
    best = best_trial_encoder(found.tracking_uri, found.parent_run_id, [found.best_trial_id])
    return Selected(pre, found, best, found.best_config_path)


def score(root: Path, splits: Splits, chosen: Selected, layers: str, t0: float) -> str:
    """Step 4: the probe, the only reader of the test split. Returns its MLflow run id."""
    import logging

    from evaluation.run import ProbeRunConfig, run_probe

    stage("4/4 linear probes and kNN on frozen features vs random init and raw pixels", t0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pretrained = f"runs:/{chosen.pretrained.mlflow_run_id}/encoder/generator.pt"
    res = run_probe(ProbeRunConfig(
        encoders={"pretrained": pretrained, "tune_best": chosen.tune_best_uri},
        train_shards=splits.train, test_shards=splits.test, image_size=32,
        output_root=str(root), tracking_uri=chosen.pretrained.tracking_uri,
        experiment="digits-probe", inpaint_images=0, layers=layers,
    ))  # fmt: skip
    print(res.summary())
    return res.run_id
