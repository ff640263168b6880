"""Benchmark: the streaming linear probe (evaluation/streaming_probe.py), two modes.

Synthetic (default): a class-structured float32 feature set too big for the sklearn probe
(1.28M x 4096, 1000 classes: ~21 GB, ImageNet-1k at one 4096-d layer), written as Parquet in
the cache layout with row groups of --row-group rows, plus a test file drawn the same way. The
probe then trains ONE head (one C, all rows) for --epochs epochs in a child process, so its peak
RSS (ru_maxrss) is the probe's alone, not the writer's. Target: peak RSS < 4 GB.

    python benchmarks/bench_streaming_probe.py --rows 1280000 --epochs 1 --dir /work/tmp_bench

The files are deleted afterwards unless --keep. The full probe trains 2K heads (K grid Cs, on
the carved part and on all rows) from the same reads: the same IO, 2K x the matmul work.

CIFAR-10 (--cifar): the scikit-learn probe (`evaluation.probe.fit_probe`, in memory) against the
streaming probe on the same cached feature files, top-1 side by side (target: within 0.5 point).

    python benchmarks/bench_streaming_probe.py --cifar \\
        --pair /work/exp_out/feature_cache/fa2af50bcd5660f7:conv2 \\
        --pair /work/exp_out/feature_cache/37c89dbbdd7b0386:bottleneck

A --pair is FOLDER:LAYER; the folder holds train-*__LAYER.parquet and test-*__LAYER.parquet.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py, when run as a file

from evaluation.streaming_probe import (  # noqa: E402
    FeatureFile,
    Heads,
    StreamingFit,
    StreamingSettings,
    feature_moments,
    fit_streaming_probe,
    score_streaming_probe,
    steps_per_epoch,
    train_heads,
)
from machine import describe  # noqa: E402

GB = 1024**3


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- synthetic features


def write_synthetic(path: Path, rows: int, dim: int, classes: int, row_group: int, seed: int):
    """Gaussian class means (shared by train and test: seed 0) + unit noise, one row group at a
    time, so the writer holds one row group. The mean scale puts the Bayes top-1 well inside
    (0, 1), so accuracy says whether the probe learned. The noise rows come from a bank of
    `row_group` standard-normal rows, permuted and sign-flipped per row group: drawing 5e9
    normals took most of the writing time on the shared 2-core machine (3 GB in 8 min)."""
    means = np.random.default_rng(0).normal(0, 0.05, size=(classes, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((row_group, dim), dtype=np.float32)
    schema = pa.schema([("key", pa.string()), ("label", pa.int64()),
                        ("feature", pa.list_(pa.float32(), dim))])  # fmt: skip
    # Random floats do not compress: skipping compression makes the write and reads cheaper.
    with pq.ParquetWriter(path, schema, compression="none") as w:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            y = rng.integers(0, classes, n)
            sign = np.where(rng.random(n) < 0.5, -1, 1).astype(np.float32)[:, None]
            x = bank[rng.permutation(row_group)[:n]]
            x *= sign
            x += means[y]
            feat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
            keys = pa.array([f"syn-{i:09d}" for i in range(start, start + n)])
            w.write_table(pa.table([keys, pa.array(y), feat], schema=schema))
    return path


def log_rss_every(seconds: float) -> None:
    """A daemon thread logging the peak RSS so far: a long run shows its memory while it runs."""

    def loop() -> None:
        while True:
            time.sleep(seconds)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
            logging.getLogger("bench").info("peak RSS so far %.2f GB", peak)

    threading.Thread(target=loop, daemon=True).start()


def fit_one_head(
    train: Path, test: Path, s: StreamingSettings, c: float, max_steps: int | None
) -> dict:
    """Moments, s.epochs epochs of one head at C (all rows), then test scoring: the probe's
    streaming path without the C sweep. Runs in the child process."""
    device = s.torch_device()
    f = FeatureFile(train, s.chunk_rows)
    t0 = time.perf_counter()
    labels = f.labels()
    classes, y = np.unique(labels, return_inverse=True)
    (m,) = feature_moments(f, np.zeros(f.n_rows, np.int64), 1, device)
    t1 = time.perf_counter()
    decay = 1.0 / (c * f.n_rows)
    per_epoch = steps_per_epoch(f.n_rows, s)
    total = s.epochs * per_epoch
    heads = Heads(m, [decay], len(classes), device)
    history = train_heads(f, y, [(heads, np.ones(f.n_rows, bool))], s, max_steps=max_steps)
    t2 = time.perf_counter()
    fit = StreamingFit(classes=classes, heads=heads, index=0, c=c, c_final=c, decay=decay,
                       n_final=f.n_rows, epochs=s.epochs)  # fmt: skip
    metrics, _ = score_streaming_probe(fit, test, s.chunk_rows)
    t3 = time.perf_counter()
    return {
        "moments_s": t1 - t0, "train_s": t2 - t1, "score_s": t3 - t2, "objective": history,
        "steps": min(max_steps or total, total), "steps_per_epoch": per_epoch,
        "top1": metrics["probe_top1"], "top5": metrics["probe_top5"],
        "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "machine": describe(device),
    }  # fmt: skip


def synthetic(args: argparse.Namespace) -> None:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    train, test = root / "syn-train.parquet", root / "syn-test.parquet"
    say(f"machine: {describe()}")
    t0 = time.perf_counter()
    if not (args.keep and train.is_file() and test.is_file()):
        write_synthetic(train, args.rows, args.dim, args.classes, args.row_group, seed=1)
        write_synthetic(test, args.test_rows, args.dim, args.classes, args.row_group, seed=2)
    t_write = time.perf_counter() - t0
    size = train.stat().st_size / GB
    say(
        f"wrote {args.rows} x {args.dim} ({size:.1f} GB) + {args.test_rows} test in {t_write:.0f} s"
    )
    try:
        child = [sys.executable, __file__, "--child", str(train), str(test),
                 "--epochs", str(args.epochs), "--c", str(args.c),
                 "--max-steps", str(args.max_steps)]  # fmt: skip
        # stderr passes through: the child's per-epoch log lines show progress.
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    # With --max-steps the epoch time is the measured time per step x steps per epoch.
    per_epoch = r["train_s"] / r["steps"] * r["steps_per_epoch"]
    partial = r["steps"] < args.epochs * r["steps_per_epoch"]
    ran = f"{r['steps']} of {args.epochs * r['steps_per_epoch']} steps" if partial else "all"
    rows = [
        ("write train + test Parquet", f"{t_write:.0f} s", f"{size:.1f} GB train file"),
        ("moments pass (mean/std)", f"{r['moments_s']:.0f} s", ""),
        (f"train {args.epochs} epoch(s), 1 head", f"{r['train_s']:.0f} s",
         f"ran {ran}; objective per epoch {[round(v, 3) for v in r['objective']]}"),
        ("  time per epoch" + (" (extrapolated)" if partial else ""), f"{per_epoch:.0f} s",
         f"{r['steps_per_epoch']} steps of {StreamingSettings.batch_size} rows"),
        ("score test (streamed)", f"{r['score_s']:.0f} s",
         f"top1 {r['top1']:.4f}, top5 {r['top5']:.4f} ({args.classes} classes)"),
        ("probe total", f"{r['moments_s'] + r['train_s'] + r['score_s']:.0f} s", ""),
        ("peak RSS of the probe process", f"{r['maxrss_gb']:.2f} GB",
         f"target < 4 GB; the features alone are {size:.1f} GB"),
    ]  # fmt: skip
    print(f"rows {args.rows}, dim {args.dim}, classes {args.classes}, row group {args.row_group}, "
          f"C {args.c}, epochs {args.epochs}")  # fmt: skip
    print(f"machine (probe process): {r['machine']}")
    print(f"{'step':<36}{'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:<36}{value:>10}  {note}")


# ---- CIFAR-10 agreement


def _files(folder: Path, layer: str) -> tuple[Path, Path]:
    found = {}
    for split in ("train", "test"):
        hits = sorted(folder.glob(f"{split}-*__{layer}.parquet"))
        if len(hits) != 1:
            raise SystemExit(f"--pair {folder}:{layer}: expected one {split} file, found {hits}")
        found[split] = hits[0]
    return found["train"], found["test"]


def cifar(args: argparse.Namespace) -> None:
    from evaluation import cache
    from evaluation.probe import ProbeSettings, fit_probe, score_probe

    say(f"machine: {describe(StreamingSettings().torch_device())}")
    table = []
    for pair in args.pair:
        folder, _, layer = pair.rpartition(":")
        train, test = _files(Path(folder), layer)
        t0 = time.perf_counter()
        tr, te = cache.load(train), cache.load(test)
        sk = score_probe(fit_probe(tr.x, tr.labels, ProbeSettings(blas_threads=1)), te.x, te.labels)
        t_sk = time.perf_counter() - t0
        del tr, te
        say(f"{pair}: sklearn {sk['probe_top1']:.4f} (C {sk['probe_C']:g}) in {t_sk:.0f} s")
        t0 = time.perf_counter()
        fit = fit_streaming_probe(train, StreamingSettings(epochs=args.epochs))
        st, _ = score_streaming_probe(fit, test)
        t_st = time.perf_counter() - t0
        say(f"{pair}: streaming {st['probe_top1']:.4f} (C {st['probe_C']:g}) in {t_st:.0f} s")
        table.append(
            (f"{Path(folder).name}/{layer}", FeatureFile(train, 1).dim, sk, t_sk, st, t_st)
        )
    print(f"{'features':<28}{'dim':>6}{'sklearn':>9}{'stream':>8}{'diff pt':>8}"
          f"{'C sk/st':>14}{'conv':>6}{'sk s':>7}{'st s':>7}")  # fmt: skip
    for name, dim, sk, t_sk, st, t_st in table:
        diff = 100 * (st["probe_top1"] - sk["probe_top1"])
        cs = f"{sk['probe_C']:g}/{st['probe_C']:g}"
        conv = f"{sk['probe_converged']:.0f}/{st['probe_converged']:.0f}"
        print(f"{name:<28}{dim:>6}{sk['probe_top1']:>9.4f}{st['probe_top1']:>8.4f}{diff:>+8.2f}"
              f"{cs:>14}{conv:>6}{t_sk:>7.0f}{t_st:>7.0f}")  # fmt: skip
    print(f"streaming: {StreamingSettings(epochs=args.epochs)}")
    print(f"machine: {describe(StreamingSettings().torch_device())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", action="store_true", help="sklearn vs streaming on cached files")
    p.add_argument("--pair", action="append", default=[], help="FOLDER:LAYER (with --cifar)")
    p.add_argument("--rows", type=int, default=1_280_000)
    p.add_argument("--test-rows", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--row-group", type=int, default=4096, help="rows per Parquet row group")
    p.add_argument("--epochs", type=int, default=StreamingSettings.epochs)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop training after this many mini-batches (0 = all epochs); the time "
                   "per epoch is then extrapolated from the steps run")  # fmt: skip
    p.add_argument("--c", type=float, default=1e-3, help="C of the synthetic run's one head")
    p.add_argument("--dir", default="/work/tmp_bench", help="where the synthetic files go")
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic files")
    p.add_argument("--child", nargs=2, metavar=("TRAIN", "TEST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        s = StreamingSettings(epochs=args.epochs)
        log_rss_every(60)
        train, test = map(Path, args.child)
        print(json.dumps(fit_one_head(train, test, s, args.c, args.max_steps or None)))
    elif args.cifar:
        if not args.pair:
            raise SystemExit("--cifar needs at least one --pair FOLDER:LAYER")
        cifar(args)
    else:
        synthetic(args)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
