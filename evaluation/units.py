"""One benchmark unit: a linear probe of one (encoder, seed, layer, pooling, label fraction),
persisted the moment it finishes, so an interrupted benchmark resumes where it stopped.

A unit is a JSON file (what validation chose and saw, the test score and how the probe was
fitted) plus a .npy of 0/1 per test image (in the cache's key order), which the paired
bootstrap of the gap needs. Both are written atomically; a unit counts as done only when both
read back. Protocols that pool a layer to the same grid (a 4x4 map is 4x4 under both) share the
unit: the key holds the pooled side, not the protocol's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from evaluation.cache import Features
from evaluation.intervals import wilson
from evaluation.probe import ProbeSettings, fit_probe


@dataclass(frozen=True)
class UnitKey:
    encoder: str
    seed: int
    layer: str
    side: int  # pooled grid side p (features are C x p x p)
    fraction: float

    def stem(self) -> str:
        return f"{self.encoder}__s{self.seed}__{self.layer}__p{self.side}__f{self.fraction:g}"


def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a stratified `fraction` of the rows (at least one a class). One
    seeded permutation per class, cut at the fraction: the subsets are nested (1 % within 10 %
    within 100 %) and the same for every encoder (rows are in the cache's key order)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    parts = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        parts.append(rows[: max(1, round(fraction * len(rows)))])
    return np.sort(np.concatenate(parts))


def keys_digest(keys: np.ndarray) -> str:
    return hashlib.sha256("\n".join(map(str, keys)).encode()).hexdigest()[:16]


def run_unit(
    key: UnitKey,
    train: Features,
    test: Features,
    settings: ProbeSettings,
    subset_seed: int = 0,
) -> tuple[dict, np.ndarray]:
    """Fit the probe on the label subset (C chosen on validation rows of that subset only),
    score on test: (record, per-image 0/1 correctness on test)."""
    idx = label_subset(train.labels, key.fraction, subset_seed)
    t0 = time.perf_counter()
    whole = len(idx) == len(train.x)  # no fancy-indexed copy of a 1-2 GB matrix
    fit = fit_probe(train.x if whole else train.x[idx], train.labels[idx], settings)
    fit_s = time.perf_counter() - t0
    correct = fit.model.predict(test.x) == test.labels
    k, n = int(correct.sum()), len(correct)
    low, high = wilson(k, n)
    record = asdict(key) | {
        "feature_dim": int(train.x.shape[1]),
        "n_train": int(len(idx)),
        "n_val": int(fit.n_val),
        "val_method": fit.method,
        "val_top1": 100 * fit.val_at_c,
        "val_by_C": {f"{c:.6g}": 100 * v for c, v in sorted(fit.val_top1.items())},
        "C": fit.c,
        "C_final": fit.c_final,
        "C_at_edge": bool(fit.at_edge),
        "converged": bool(fit.converged),
        "n_iter": int(fit.final.n_iter) if fit.final else -1,
        "test_top1": 100 * k / n,
        "test_ci_low": 100 * low,
        "test_ci_high": 100 * high,
        "test_n": n,
        "test_keys": keys_digest(test.keys),
        "train_keys": keys_digest(train.keys[idx]),
        "fit_seconds": fit_s,
    }
    return record, correct


def paths(units_dir: Path, key: UnitKey) -> tuple[Path, Path]:
    return units_dir / f"{key.stem()}.json", units_dir / f"{key.stem()}.npy"


def save_unit(units_dir: Path, key: UnitKey, record: dict, correct: np.ndarray) -> None:
    """The .npy first, the JSON last (both atomic): a JSON on disk means a complete unit."""
    units_dir.mkdir(parents=True, exist_ok=True)
    js, npy = paths(units_dir, key)
    tmp = npy.with_name(f".{npy.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, correct.astype(np.bool_))
    os.replace(tmp, npy)
    tmp = js.with_name(f".{js.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, js)


def load_unit(units_dir: Path, key: UnitKey) -> dict | None:
    """The unit's record, or None when it is not done (or its files do not read back)."""
    js, npy = paths(units_dir, key)
    if not (js.is_file() and npy.is_file()):
        return None
    try:
        record = json.loads(js.read_text())
    except ValueError:
        return None
    return record if record.get("test_n") else None


def load_correct(units_dir: Path, key: UnitKey) -> np.ndarray:
    return np.load(paths(units_dir, key)[1]).astype(np.float64)
