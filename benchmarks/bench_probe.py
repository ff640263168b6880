"""Benchmark: the full CIFAR-10 linear probe (50,000 train / 10,000 test) for one encoder and
one layer, C sweep included, timed as extraction vs fitting. Target: under 5 minutes in all.

    python benchmarks/bench_probe.py [--cifar-dir ../shared/datasets/cifar10] [--layer conv3]

The encoder is the CIFAR configuration (32 px, width 64) at its random initialisation, saved
and loaded through the real encoder-file path. Fitting levers used by `fit_probe`: float32
features pooled to <= 4096 dims, a 4-value C grid swept on a 10k-row subset of the train split
with warm starts (ascending C), and the final refit warm-started from the best sweep solution.
The baseline, measured in the same run on the same features, is the naive recipe: float64,
every C fitted from scratch on the full train split, then a from-scratch refit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from evaluation.extraction import SplitSpec, split_features
from evaluation.features import load_encoder
from evaluation.probe import ProbeSettings, fit_probe, score_probe
from machine import cpu_model
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

REPO = Path(__file__).resolve().parents[1]


def naive_fit(x, y, grid, max_iter, seed):
    """The baseline: float64, each C from scratch on the full train split, refit from scratch."""
    x = x.astype(np.float64)
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=0.1, random_state=seed, stratify=y)
    best, best_acc = None, -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
            acc = pipe.fit(x_tr, y_tr).score(x_val, y_val)
            if acc > best_acc:
                best, best_acc = c, acc
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=max_iter))
        return pipe.fit(x, y), best


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def extraction(layer: str, cifar: Path, tmp: Path):
    """Timed: train and test features through the real encoder-file and cache path."""
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=64))
    torch.manual_seed(0)
    save_encoder(tmp / "generator.pt", build_generator(cfg.model), cfg)
    enc = load_encoder("random_init_w64", str(tmp / "generator.pt"), tmp)
    specs = {
        "train": SplitSpec("train", str(cifar / "cifar10-train-{000000..000009}.tar"), 32),
        "test": SplitSpec("test", str(cifar / "cifar10-test-{000000..000001}.tar"), 32),
    }
    t0 = time.perf_counter()
    feats = {n: split_features(enc, [layer], s, tmp / "cache")[layer] for n, s in specs.items()}
    t_extract = time.perf_counter() - t0
    say(f"extracted {layer}: train {feats['train'].x.shape}, test {feats['test'].x.shape}")
    t0 = time.perf_counter()
    split_features(enc, [layer], specs["train"], tmp / "cache")
    return feats, t_extract, time.perf_counter() - t0


def baseline_rows(tr, te, settings: ProbeSettings, n: int) -> list[tuple[str, float, str]]:
    """Ours vs the naive recipe on the same first `n` train rows (the naive recipe on all 50k
    would take tens of minutes here)."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(tr.x), size=min(n, len(tr.x)), replace=False))
    x, y = tr.x[idx], tr.labels[idx]
    t0 = time.perf_counter()
    ours = score_probe(fit_probe(x, y, settings), te.x, te.labels)["probe_top1"]
    t_ours = time.perf_counter() - t0
    say(f"ours on {len(x)} rows: {t_ours:.1f} s")
    t0 = time.perf_counter()
    naive, _ = naive_fit(x, y, settings.c_grid, 100, 0)  # sklearn's default max_iter
    t_naive = time.perf_counter() - t0
    acc = float((naive.predict(te.x.astype(np.float64)) == te.labels).mean())
    return [
        (f"ours, fitting on {len(x)} rows", t_ours, f"top1 {ours:.4f}"),
        (f"baseline naive f64, same {len(x)} rows", t_naive, f"top1 {acc:.4f}"),
        ("fitting speed-up vs baseline (ratio)", t_naive / t_ours, "x"),
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--layer", default="conv3")
    p.add_argument("--baseline-rows", type=int, default=5000, help="0 skips the baseline")
    args = p.parse_args()
    settings = ProbeSettings()
    say(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        feats, t_extract, t_cache = extraction(args.layer, Path(args.cifar_dir), Path(tmp))
    tr, te = feats["train"], feats["test"]
    t0 = time.perf_counter()
    fit = fit_probe(tr.x, tr.labels, settings)
    metrics = score_probe(fit, te.x, te.labels)
    t_fit = time.perf_counter() - t0
    say(f"probe: {metrics}; val top-1 per C {fit.val_top1}")
    rows = [
        ("extraction (train 50k + test 10k)", t_extract, ""),
        ("  train features again, from cache", t_cache, ""),
        ("fitting: C sweep + refit + score", t_fit, f"top1 {metrics['probe_top1']:.4f}"),
        ("total (extraction + fitting)", t_extract + t_fit, "target < 300 s"),
    ]
    if args.baseline_rows:
        rows += baseline_rows(tr, te, settings, args.baseline_rows)
    print(
        f"features: layer {args.layer}, dim {tr.x.shape[1]} float32, train {len(tr.x)}, test "
        f"{len(te.x)}; C grid {list(settings.c_grid)} swept on {settings.sweep_max_samples} "
        f"rows (warm starts, max_iter {settings.max_iter}); chosen C {metrics['probe_C']}"
    )
    print(f"{'step':<42}{'value':>10}  note")
    for name, secs, note in rows:
        print(f"{name:<42}{secs:>10.1f}  {note}")


if __name__ == "__main__":
    main()
