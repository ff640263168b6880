"""The tune YAML: what to search, how many trials, which metric ranks them, ASHA's and the kNN
score's settings; and the base pretrain config it points at, loaded and validated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, apply_overrides, from_dict, read_yaml, validate

SearchMetric = Literal["val_rec_l2", "knn_top1"]  # what ranks trials (YAML key `objective`)
MODES = {"val_rec_l2": "min", "knn_top1": "max"}


@dataclass(frozen=True)
class AshaSettings:
    grace_period: int = 1  # checkpoint reports a trial always gets before it may be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class KnnScoreSettings:
    """The kNN score of each checkpoint (`KnnScore`); not the linear probe's settings."""

    train_samples: int = 1000  # labelled training images whose features the kNN votes with
    val_samples: int = 500  # held-out images it classifies
    layer: str = ""  # "" = the deepest encoder layer
    max_dim: int = 2048  # pooled feature size cap


@dataclass(frozen=True)
class TuneSettings:
    name: str = "tune"  # the search's name: Tune experiment, MLflow parent run
    pretrain_config: str = ""  # a jobs.pretrain YAML (relative paths: to this file)
    overrides: dict[str, Any] = field(default_factory=dict)  # per-trial budget, e.g. max_steps
    space: dict[str, dict] = field(default_factory=dict)  # dotted key -> distribution
    num_samples: int = 4
    objective: SearchMetric = "knn_top1"
    # 0 = no cap: every trial starts and waits for its workers' CPUs, so a search scales out as
    # nodes join (driver.concurrent_trials); N = at most N trials at once
    max_concurrent_trials: int = 0
    max_failures: int = 1  # retries of a failed trial
    seed: int = 0  # the search's sampler: the same seed draws the same trial configs
    asha: AshaSettings = field(default_factory=AshaSettings)
    probe: KnnScoreSettings = field(default_factory=KnnScoreSettings)  # the kNN score's YAML key


def as_overrides(values: dict[str, Any]) -> list[str]:
    """{dotted key: value} -> `key=value` overrides, each value in YAML flow style."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in values.items()]


def load_settings(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[TuneSettings, dict]:
    """The search settings and the base pretrain config dict (budget overrides applied)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tune config not found: {p}")
    raw = apply_overrides(read_yaml(p) or {}, overrides or [])
    settings: TuneSettings = from_dict(raw, TuneSettings)
    if not settings.pretrain_config:
        raise ConfigError("tune: pretrain_config (a jobs.pretrain YAML) is required")
    base_path = (p.parent / settings.pretrain_config).resolve()
    if not base_path.is_file():
        raise ConfigError(f"tune: pretrain_config not found: {base_path}")
    budget = as_overrides(settings.overrides)
    base = apply_overrides(read_yaml(base_path) or {}, budget)
    validate(from_dict(base))
    if not (base.get("data") or {}).get("val_shards"):
        # Every trial is ranked on held-out images (knn_top1 queries, val_rec_l2): without
        # them the kNN's queries would be its own training images, each finding itself.
        raise ConfigError(
            f"tune: {base_path.name} sets no data.val_shards; a search ranks trials on held-out "
            "images (the kNN score would query the training images, which find themselves)"
        )
    if settings.num_samples < 1:
        raise ConfigError("tune: num_samples must be >= 1")
    if settings.max_concurrent_trials < 0:
        raise ConfigError("tune: max_concurrent_trials must be >= 0 (0 = no cap)")
    return settings, base
