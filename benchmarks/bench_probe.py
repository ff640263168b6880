"""Benchmark: the full CIFAR-10 linear probe (50,000 train / 10,000 test) for one encoder and
one layer, C sweep included, timed as extraction vs C sweep vs refit. Target: under 5 minutes.

    python benchmarks/bench_probe.py [--cifar-dir ../shared/datasets/cifar10] [--layer conv3]
        [--protocol gap|spatial]

`--protocol` pools the layer as `ce-benchmark` does (gap: <= 4096 values, spatial: <= 9216), and
the probe is the benchmark's (`BENCHMARK_PROBE`: grid 1e-3, 3e-3, 1e-2, extended by
half-decades at an edge).

The encoder is the CIFAR configuration (32 px, width 64) at its random initialisation, saved
and loaded through the real encoder-file path. `fit_probe` with its defaults: float32 features
pooled to <= 4096 dims, the C grid swept on the whole carved train split (45k rows; ascending,
warm-started lbfgs run to tol), then the refit on all 50k rows at the chosen C
scaled to 50k rows. Printed: wall and CPU time per step, the load average (the machine is
shared), and per fit the lbfgs iterations and whether it converged. On a busy machine
`--blas-threads 1` is much faster than the default (see ProbeSettings.blas_threads).
The baseline, measured in the same run on the same (sub-sampled) features, is the naive
recipe: float64, every C fitted from scratch (same tol and max_iter), then a from-scratch refit
at the scaled C; it shows what the warm starts save and that they reach the same probe.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from evaluation.bench_config import BENCHMARK_PROBE, PROTOCOLS
from evaluation.extraction import SplitSpec, split_features
from evaluation.features import load_encoder
from evaluation.probe import (
    ProbeFit,
    ProbeSettings,
    best_c,
    fit_probe,
    grid_for,
    scale_c,
    score_probe,
)
from machine import describe
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

REPO = Path(__file__).resolve().parents[1]


def naive_fit(x, y, settings: ProbeSettings):
    """The baseline: float64, each C from scratch on the carved train split, refit from scratch
    at the C scaled to all rows; same tol and max_iter as the probe."""
    x = x.astype(np.float64)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=settings.val_fraction, random_state=settings.seed, stratify=y
    )

    def fresh(c: float):
        lr = LogisticRegression(C=c, max_iter=settings.max_iter, tol=settings.tol)
        return make_pipeline(StandardScaler(), lr)

    grid = grid_for(settings, len(x_tr))  # the same Cs as ours (no extension on either side)
    scores = {c: fresh(c).fit(x_tr, y_tr).score(x_val, y_val) for c in grid}
    best = best_c(scores)
    return fresh(scale_c(best, len(x_tr), len(x))).fit(x, y), best


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def extraction(layer: str, cifar: Path, tmp: Path, max_dim: int):
    """Timed: train and test features through the real encoder-file and cache path."""
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=64))
    torch.manual_seed(0)
    save_encoder(tmp / "generator.pt", build_generator(cfg.model), cfg)
    enc = load_encoder("random_init_w64", str(tmp / "generator.pt"), tmp)
    specs = {
        "train": SplitSpec(
            "train", str(cifar / "cifar10-train-{000000..000009}.tar"), 32, max_dim=max_dim
        ),
        "test": SplitSpec(
            "test", str(cifar / "cifar10-test-{000000..000001}.tar"), 32, max_dim=max_dim
        ),
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
    settings = dataclasses.replace(settings, extend_steps=0)  # the naive recipe has none
    t0 = time.perf_counter()
    ours = score_probe(fit_probe(x, y, settings), te.x, te.labels)["probe_top1"]
    t_ours = time.perf_counter() - t0
    say(f"ours on {len(x)} rows: {t_ours:.1f} s")
    t0 = time.perf_counter()
    naive, _ = naive_fit(x, y, settings)
    t_naive = time.perf_counter() - t0
    acc = float((naive.predict(te.x.astype(np.float64)) == te.labels).mean())
    return [
        (f"ours, fitting on {len(x)} rows", t_ours, f"top1 {ours:.4f}"),
        (f"baseline naive f64, same {len(x)} rows", t_naive, f"top1 {acc:.4f}"),
        ("fitting speed-up vs baseline (ratio)", t_naive / t_ours, "x"),
    ]


def fit_lines(fit: ProbeFit) -> list[str]:
    """One line per lbfgs fit: the sweep's Cs with validation top-1, then the refit."""
    lines = [
        f"  sweep C={r.c:<8g} rows {r.n_rows}  val top1 {fit.val_top1[r.c]:.4f}  "
        f"n_iter {r.n_iter:>4}  converged {int(r.converged)}  {r.seconds:6.1f} s"
        for r in fit.sweep_runs
    ]
    r = fit.final
    lines.append(
        f"  refit C={r.c:<8.4g} rows {r.n_rows}  (chosen C {fit.c:g} x {fit.n_sweep}/{fit.n_final})"
        f"  n_iter {r.n_iter:>4}  converged {int(r.converged)}  {r.seconds:6.1f} s"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cifar-dir", default=str(REPO.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--layer", default="conv3")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="gap")
    p.add_argument("--baseline-rows", type=int, default=5000, help="0 skips the baseline")
    p.add_argument(
        "--blas-threads",
        type=int,
        default=ProbeSettings.blas_threads,
        help="BLAS threads for the probe fits (0 = the library's default)",
    )
    args = p.parse_args()
    settings = dataclasses.replace(BENCHMARK_PROBE, blas_threads=args.blas_threads)
    say(f"machine: {describe()}, scikit-learn {sklearn.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        feats, t_extract, t_cache = extraction(
            args.layer, Path(args.cifar_dir), Path(tmp), PROTOCOLS[args.protocol]
        )
    tr, te = feats["train"], feats["test"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    fit = fit_probe(tr.x, tr.labels, settings)
    t1 = time.perf_counter()
    metrics = score_probe(fit, te.x, te.labels)
    t_fit, t_score = t1 - t0, time.perf_counter() - t1
    cpu_fit = time.process_time() - cpu0
    say(f"probe: {metrics}")
    print("\n".join(fit_lines(fit)))
    t_other = t_fit - fit.sweep_seconds - fit.refit_seconds
    rows = [
        ("extraction (train 50k + test 10k)", t_extract, ""),
        ("  train features again, from cache", t_cache, ""),
        (f"C sweep ({len(fit.sweep_runs)} Cs on {fit.n_sweep} rows)", fit.sweep_seconds,
         f"chosen C {fit.c:g}, iters {sum(r.n_iter for r in fit.sweep_runs)}"),
        (f"refit on {fit.n_final} rows", fit.refit_seconds,
         f"C_final {fit.c_final:.4g}, n_iter {fit.final.n_iter}, converged {int(fit.converged)}"),
        ("score on test (+ input checks)", t_score + t_other, f"top1 {metrics['probe_top1']:.4f}"),
        ("fitting: C sweep + refit + score", t_fit + t_score, f"CPU {cpu_fit:.1f} s"),
        ("total (extraction + fitting)", t_extract + t_fit + t_score,
         f"target < 300 s; load now {os.getloadavg()[0]:.1f}"),
    ]  # fmt: skip
    if args.baseline_rows:
        rows += baseline_rows(tr, te, settings, args.baseline_rows)
    print(
        f"protocol {args.protocol}: layer {args.layer}, dim {tr.x.shape[1]} float32, train "
        f"{len(tr.x)}, test {len(te.x)}; C grid {list(settings.c_grid)} at "
        f"{settings.grid_rows or 'as given'} rows swept on {fit.n_sweep} rows (warm starts, tol "
        f"{settings.tol:g}, max_iter {settings.max_iter}, BLAS threads "
        f"{settings.blas_threads or 'default'}); chosen C at an edge after the extension: "
        f"{bool(fit.at_edge)}; chosen C "
        f"{metrics['probe_C']:g}, C_final {metrics['probe_C_final']:.4g}, refit n_iter "
        f"{metrics['probe_n_iter']:.0f}, converged {metrics['probe_converged']:.0f}"
    )
    print(f"{'step':<42}{'value':>10}  note")
    for name, secs, note in rows:
        print(f"{name:<42}{secs:>10.1f}  {note}")


if __name__ == "__main__":
    main()
