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
import platform
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
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--layer", default="conv3")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive fitting baseline")
    args = p.parse_args()
    d = Path(args.cifar_dir)
    train_urls = str(d / "cifar10-train-{000000..000009}.tar")
    test_urls = str(d / "cifar10-test-{000000..000001}.tar")
    settings = ProbeSettings()
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=64))

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_encoder(Path(tmp) / "generator.pt", build_generator(cfg.model), cfg)
        enc = load_encoder("random_init_c64", str(Path(tmp) / "generator.pt"), tmp)
        t0 = time.perf_counter()
        feats = {
            name: split_features(enc, [args.layer], SplitSpec(name, urls, 32), Path(tmp) / "c")[
                args.layer
            ]
            for name, urls in (("train", train_urls), ("test", test_urls))
        }
        t_extract = time.perf_counter() - t0
        t1 = time.perf_counter()
        split_features(enc, [args.layer], SplitSpec("train", train_urls, 32), Path(tmp) / "c")
        t_cache = time.perf_counter() - t1

    tr, te = feats["train"], feats["test"]
    t0 = time.perf_counter()
    fit = fit_probe(tr.x, tr.labels, settings)
    metrics = score_probe(fit, te.x, te.labels)
    t_fit = time.perf_counter() - t0

    rows = [
        ("extraction (train 50k + test 10k)", t_extract, ""),
        ("  train features again from cache", t_cache, ""),
        ("fitting: sweep + refit + score", t_fit, f"top1 {metrics['probe_top1']:.4f}"),
        ("total (extraction + fitting)", t_extract + t_fit, "target < 300 s"),
    ]
    if not args.no_baseline:
        t0 = time.perf_counter()
        naive, naive_c = naive_fit(tr.x, tr.labels, settings.c_grid, settings.max_iter, 0)
        t_naive = time.perf_counter() - t0
        acc = float((naive.predict(te.x.astype(np.float64)) == te.labels).mean())
        rows.append(("baseline fitting: naive float64, full", t_naive, f"top1 {acc:.4f}"))
        rows.append(("fitting speed-up vs baseline", t_naive / t_fit, "x (ratio)"))

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}")  # fmt: skip
    print(
        f"features: layer {args.layer}, dim {tr.x.shape[1]}, train {len(tr.x)}, test {len(te.x)}; "
        f"C grid {list(settings.c_grid)}, sweep on {settings.sweep_max_samples} rows, "
        f"chosen C {metrics['probe_C']}, val top-1 {fit.val_top1}"
    )
    print(f"probe: {metrics}")
    print(f"{'step':<40}{'seconds':>10}  note")
    for name, secs, note in rows:
        print(f"{name:<40}{secs:>10.1f}  {note}")


if __name__ == "__main__":
    main()
