"""Linear probe streamed from a Parquet feature file: never holds the feature matrix.

The scikit-learn probe (`evaluation.probe`) needs every feature in RAM: ImageNet-1k at 4096-d
is ~21 GB a layer. This probe reads the cache file (`evaluation.cache` layout: key, label,
feature) in chunks of at most `chunk_rows` rows and keeps only the labels (8 bytes a row), the
scaler statistics and the weights:

1. One pass: mean and std (ddof 0, as StandardScaler) of the carved train part and of all rows,
   merged chunk by chunk (Chan et al.'s parallel variance, float64).
2. E epochs of mini-batch Adam on the softmax cross-entropy + L2 objective with the SAME
   per-sample meaning as scikit-learn's C: sklearn minimises ½||W||² + C·Σ_i CE_i, i.e.
   mean_i CE_i + ||W||² / (2·C·n), so the weight decay per sample is λ = 1 / (C·n) (the
   intercept is not penalised, as in sklearn). Every grid C is trained at once, as one head per
   C: K heads on the carved train part (each at λ = 1/(C·n_sweep)) and K on all rows at the same
   λ (= the refit at `scale_c(C, n_sweep, n)`), so one read of the file serves the sweep and the
   refit. Why Adam and not L-BFGS: L-BFGS needs full-batch gradients and line searches, i.e.
   several passes per step; the objective is strongly convex (λ > 0), so a mini-batch method
   with a schedule that decays to zero reaches its optimum closely enough (see
   docs/streaming_probe.md for the agreement with sklearn), and Adam's per-coordinate scaling
   copes with the badly conditioned correlated features that slow plain SGD.
3. One pass: validation top-1 of the K carved heads (C chosen there, never on test; ties to the
   smaller C, as `probe.best_c`), and the full-data gradient of every refit head at its final
   weights: `converged` means its largest entry is below `grad_tol` (sklearn's lbfgs test).
4. Scoring streams the test file the same way.

Shuffling without random access: each epoch reads the row groups in a seeded order and fills a
buffer of `shuffle_chunks` chunks whose rows are permuted before the mini-batches are cut. A
file written as one big row group (the cache writer's default up to 1M rows) is read in its
stored order (sorted by key), mixed only within the buffer: write big files with row groups of
about `chunk_rows` rows (as benchmarks/bench_streaming_probe.py does).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from evaluation.probe import DEFAULT_C_GRID, best_c, edge_step, scale_c, val_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingSettings:
    c_grid: tuple[float, ...] = DEFAULT_C_GRID  # C at the sweep's rows, as ProbeSettings.c_grid
    val_fraction: float = 0.1  # the same stratified carve of train as the sklearn probe
    # Adam with a cosine schedule to zero. Measured on CIFAR-10 (50k rows, vs sklearn's top-1):
    # bottleneck (512-d) 5 epochs at lr 1e-3 (batch 512) -2.8 points, 10 epochs at lr 1e-2
    # (batch 1024) +0.05; conv1 (4096-d) 10 epochs -0.37, 20 epochs +0.02
    # (docs/streaming_probe.md). Fewer suffice when an epoch has many more rows.
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 1e-2
    warmup_fraction: float = 0.02  # of all steps: linear warm-up before the cosine decay
    # Rows per read (the memory bound: chunk_rows x dim x 4 bytes per chunk in the buffer).
    chunk_rows: int = 4096
    shuffle_chunks: int = 8  # chunks mixed in one shuffle buffer
    # A refit head counts as converged when the largest entry of its full-data gradient (of the
    # per-sample objective) is below this: sklearn's lbfgs test, looser than its tol 1e-4, as a
    # stochastic method closes in slower at the end. On CIFAR-10 the defaults ended at 1.5e-3
    # (bottleneck, 10 epochs), 3e-3 (conv2, 10) and 2e-3 (conv1, 20), top-1 within 0.05 point.
    grad_tol: float = 5e-3
    device: str = ""  # "" = cuda when available, else cpu
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "c_grid": bool(self.c_grid) and all(c > 0 for c in self.c_grid),
            "val_fraction": 0 < self.val_fraction < 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "chunk_rows": self.chunk_rows >= 1,
            "shuffle_chunks": self.shuffle_chunks >= 1,
            "grad_tol": self.grad_tol > 0,
        }
        if bad := [k for k, ok in checks.items() if not ok]:
            raise ValueError(f"StreamingSettings: invalid {bad}: {self}")

    def torch_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_tensor(x: np.ndarray, device: torch.device, dtype=torch.float32) -> Tensor:
    """A chunk on `device`. Arrow hands out read-only zero-copy arrays; torch only reads them
    here (the copy to `device`/`dtype` makes its own), so its not-writable warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x).to(device, dtype)


class FeatureFile:
    """A Parquet feature file (evaluation.cache layout) read in chunks of <= chunk_rows rows."""

    def __init__(self, path: str | Path, chunk_rows: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature file {self.path} not found")
        self.file = pq.ParquetFile(self.path)
        names = self.file.schema_arrow.names
        if "label" not in names or "feature" not in names:
            raise ValueError(f"feature file {self.path}: needs columns label, feature; has {names}")
        self.dim = self.file.schema_arrow.field("feature").type.list_size
        if self.dim <= 0:
            raise ValueError(f"feature file {self.path}: feature must be a fixed-size list")
        self.chunk_rows = chunk_rows
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_rows = int(self.group_start[-1])

    def labels(self) -> np.ndarray:
        """The label column (int64), streamed: 8 bytes a row."""
        parts = [
            b.column("label").to_numpy()
            for b in self.file.iter_batches(batch_size=65536, columns=["label"])
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def chunks(self, group_order: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row index, (n, dim) float32) chunks of <= chunk_rows rows, row group by row
        group in `group_order` (default: stored order)."""
        order = range(len(self.group_start) - 1) if group_order is None else group_order
        for g in order:
            start = int(self.group_start[g])
            for batch in self.file.iter_batches(
                batch_size=self.chunk_rows, row_groups=[int(g)], columns=["feature"],
                use_threads=False,
            ):  # fmt: skip
                x = batch.column("feature").flatten().to_numpy(zero_copy_only=False)
                x = x.astype(np.float32, copy=False).reshape(-1, self.dim)
                yield start, x
                start += len(x)


@dataclass(frozen=True)
class Moments:
    """Per-feature mean and std (ddof 0) of some rows; std of constant features is 1, as
    StandardScaler's. `m2` is the sum of squared deviations, kept so moments can be merged."""

    n: int
    mean: np.ndarray  # (D,) float64
    m2: np.ndarray  # (D,) float64

    @property
    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.n, 1))
        std[std < 10 * np.finfo(np.float64).eps] = 1.0
        return std

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint row sets (Chan et al.'s parallel update)."""
        n = self.n + other.n
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        return Moments(n, mean, self.m2 + other.m2 + delta**2 * (self.n * other.n / n))


def feature_moments(
    f: FeatureFile, groups: np.ndarray, n_groups: int, device: torch.device | None = None
) -> list[Moments]:
    """Mean and std of the rows of each group (groups[i] in [0, n_groups)) in one pass: each
    chunk's moments in float64, merged into the running ones, so the result matches numpy's."""
    device = device or torch.device("cpu")
    d = f.dim
    out = [Moments(0, np.zeros(d), np.zeros(d)) for _ in range(n_groups)]
    for start, x in f.chunks():
        xs = as_tensor(x, device, torch.float64)
        g = groups[start : start + len(x)]
        for k in range(n_groups):
            rows = xs[torch.from_numpy(g == k).to(device)]
            if len(rows) == 0:
                continue
            mb = rows.mean(0)
            m2b = ((rows - mb) ** 2).sum(0)
            out[k] = out[k].merge(Moments(len(rows), mb.cpu().numpy(), m2b.cpu().numpy()))
    return out


class Heads(torch.nn.Module):
    """K linear softmax heads on standardised features, one weight decay each; heads of one
    group share rows and scaler. W is (D, K*C) so all heads are one matmul."""

    def __init__(self, moments: Moments, decays: list[float], n_classes: int, device) -> None:
        super().__init__()
        d, k = len(moments.mean), len(decays)
        self.k, self.c = k, n_classes
        self.register_buffer("mean", torch.tensor(moments.mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.tensor(1 / moments.std, dtype=torch.float32))
        self.register_buffer("decay", torch.tensor(decays, dtype=torch.float32))
        # Zero start, as lbfgs in sklearn: the problem is convex, the start only sets the path.
        self.w = torch.nn.Parameter(torch.zeros(d, k * n_classes))
        self.b = torch.nn.Parameter(torch.zeros(k, n_classes))
        self.to(device)

    def logits(self, x: Tensor) -> Tensor:
        """(n, D) raw features -> (n, K, C)."""
        z = (x - self.mean) * self.inv_std
        return (z @ self.w).view(len(x), self.k, self.c) + self.b

    def ce_sum(self, x: Tensor, y: Tensor) -> Tensor:
        """Σ over rows and heads of the cross-entropy: (n, K, C) vs (n,)."""
        logits = self.logits(x)
        target = y[:, None].expand(len(y), self.k)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum")

    def penalty(self) -> Tensor:
        """Σ_k λ_k/2 ||W_k||²; the intercept is not penalised (as sklearn)."""
        w = self.w.view(-1, self.k, self.c)
        return 0.5 * (self.decay[None, :, None] * w.square()).sum()


class Adam:
    """Adam (Kingma & Ba 2015) on a few tensors, with the learning rate passed per step.
    Not torch.optim.Adam: its first construction imports torch._dynamo, which took 31 s on the
    loaded 2-core machine, longer than a CIFAR-10 epoch of this probe."""

    def __init__(self, params: list[Tensor], betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.params, self.betas, self.eps, self.t = params, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total` steps."""
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * peak * (1 + math.cos(math.pi * min(t, 1.0)))


def shuffled_batches(
    f: FeatureFile, s: StreamingSettings, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices, features) mini-batches of one epoch: row groups in a seeded order, rows
    permuted within a buffer of `shuffle_chunks` chunks (filled in place: no second copy)."""
    rng = np.random.default_rng((s.seed, epoch))
    n_groups = len(f.group_start) - 1
    buf = np.empty((s.chunk_rows * s.shuffle_chunks, f.dim), np.float32)
    rows = np.empty(len(buf), np.int64)
    fill = 0

    def drain(n: int):
        perm = rng.permutation(n)
        for i in range(0, n, s.batch_size):
            sel = perm[i : i + s.batch_size]
            yield rows[sel], buf[sel]

    for start, x in f.chunks(rng.permutation(n_groups)):
        if fill + len(x) > len(buf):
            yield from drain(fill)
            fill = 0
        buf[fill : fill + len(x)] = x
        rows[fill : fill + len(x)] = np.arange(start, start + len(x))
        fill += len(x)
    if fill:
        yield from drain(fill)


def steps_per_epoch(n_rows: int, s: StreamingSettings) -> int:
    """An upper bound (one partial batch per buffer), which only stretches the schedule's end."""
    per_buffer = s.chunk_rows * s.shuffle_chunks
    full, rest = divmod(n_rows, per_buffer)
    return full * math.ceil(per_buffer / s.batch_size) + math.ceil(rest / s.batch_size)


def train_heads(
    f: FeatureFile,
    y: np.ndarray,
    groups: list[tuple[Heads, np.ndarray]],
    s: StreamingSettings,
    max_steps: int | None = None,
) -> list[float]:
    """Train every group of heads on its rows (a bool mask over the file) for s.epochs epochs
    of one shared stream; returns the training objective per epoch (summed over all heads,
    averaged over the epoch's batches: it should fall and level off). `max_steps` stops early
    (benchmarks time a part of an epoch; the schedule still spans s.epochs)."""
    device = groups[0][0].w.device
    params = [p for heads, _ in groups for p in heads.parameters()]
    opt = Adam(params)
    total = s.epochs * steps_per_epoch(f.n_rows, s)
    y_t = torch.from_numpy(y)
    masks = [torch.from_numpy(m) for _, m in groups]
    history, step = [], 0
    for epoch in range(s.epochs):
        t0, seen, objective = time.perf_counter(), 0, 0.0
        for idx, x in shuffled_batches(f, s, epoch):
            xb = torch.from_numpy(x).to(device, non_blocking=True)
            ib = torch.from_numpy(idx)
            loss = 0.0
            for (heads, _), mask in zip(groups, masks, strict=True):
                keep = mask[ib]
                k = int(keep.sum())
                if k == 0:
                    continue
                # The per-sample objective's gradient, estimated on the batch's k rows of the
                # group: mean CE over them + the group's full decay term.
                part = heads.ce_sum(xb[keep.to(device)], y_t[ib[keep]].to(device)) / k
                loss = loss + part + heads.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step(lr_at(step, total, s.lr, s.warmup_fraction))
            objective += float(loss.detach()) * len(idx)
            seen += len(idx)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        history.append(objective / max(seen, 1))
        log.info("streaming probe: epoch %d/%d, objective %.4f, %.1f s", epoch + 1, s.epochs,
                 history[-1], time.perf_counter() - t0)  # fmt: skip
        if max_steps is not None and step >= max_steps:
            break
    return history


def check_pass(
    f: FeatureFile,
    y: np.ndarray,
    sweep: Heads,
    is_val: np.ndarray,
    refit: Heads,
) -> tuple[np.ndarray, np.ndarray]:
    """One pass: validation top-1 of each sweep head (val rows), and the largest entry of each
    refit head's full-data gradient of the per-sample objective at its current weights."""
    device = sweep.w.device
    correct = np.zeros(sweep.k)
    refit.zero_grad(set_to_none=True)
    for start, x in f.chunks():
        xb = as_tensor(x, device)
        yb = torch.from_numpy(y[start : start + len(x)]).to(device)
        val = torch.from_numpy(is_val[start : start + len(x)]).to(device)
        with torch.no_grad():
            if val.any():
                pred = sweep.logits(xb[val]).argmax(-1)  # (n_val, K)
                correct += (pred == yb[val][:, None]).sum(0).cpu().numpy()
        (refit.ce_sum(xb, yb) / f.n_rows).backward()  # gradients add up over chunks
    with torch.no_grad():
        w_grad = refit.w.grad.view(-1, refit.k, refit.c) + refit.decay[None, :, None] * (
            refit.w.view(-1, refit.k, refit.c)
        )
        g_max = torch.maximum(w_grad.abs().amax((0, 2)), refit.b.grad.abs().amax(1))
    refit.zero_grad(set_to_none=True)
    return correct / max(int(is_val.sum()), 1), g_max.cpu().numpy()


@dataclass
class StreamingFit:
    """A fitted streaming probe: the chosen refit head, and the sweep behind it."""

    classes: np.ndarray  # sorted training labels; head output j is classes[j]
    heads: Heads  # the refit heads (one per grid C); `index` is the chosen one
    index: int
    c: float  # chosen grid C (at n_sweep rows)
    c_final: float  # scale_c(c, n_sweep, n_final): the same per-sample decay on all rows
    decay: float  # λ = 1 / (c · n_sweep): weight decay per sample
    val_top1: dict[float, float] = field(default_factory=dict)
    n_sweep: int = 0
    n_final: int = 0
    epochs: int = 0
    grad_max: float = float("nan")
    converged: bool = False
    objective: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def carve(y: np.ndarray, s: StreamingSettings) -> np.ndarray:
    """Bool mask of the validation rows: the same stratified split (same seed, same indices) as
    `probe.carve_validation` makes of the in-memory features."""
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    _, idx_val = train_test_split(
        np.arange(len(y)), test_size=s.val_fraction, random_state=s.seed, stratify=stratify
    )
    mask = np.zeros(len(y), bool)
    mask[idx_val] = True
    return mask


def fit_streaming_probe(
    train_path: str | Path, settings: StreamingSettings = StreamingSettings()
) -> StreamingFit:
    """Choose C on the carved validation rows of the train file and fit on all its rows, reading
    it in chunks. Only the train file is read; test cannot influence C."""
    s, device = settings, settings.torch_device()
    t0 = time.perf_counter()
    f = FeatureFile(train_path, s.chunk_rows)
    labels = f.labels()
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"streaming probe: {train_path} has fewer than two classes")
    is_val = carve(labels, s)
    m_tr, m_val = feature_moments(f, is_val.astype(np.int64), 2, device)
    m_all = m_tr.merge(m_val)
    grid = sorted(set(s.c_grid))
    decays = [1.0 / (c * m_tr.n) for c in grid]  # λ = 1/(C·n_sweep), kept for the refit
    sweep = Heads(m_tr, decays, len(classes), device)
    refit = Heads(m_all, decays, len(classes), device)
    t1 = time.perf_counter()
    history = train_heads(f, y, [(sweep, ~is_val), (refit, np.ones(len(y), bool))], s)
    t2 = time.perf_counter()
    val_acc, g_max = check_pass(f, y, sweep, is_val, refit)
    val_top1 = {c: float(a) for c, a in zip(grid, val_acc, strict=True)}
    chosen = best_c(val_top1)
    if len(grid) > 1 and chosen in (grid[0], grid[-1]):
        log.warning("streaming probe: chosen C=%g is at the edge of the grid %s", chosen, grid)
    i = grid.index(chosen)
    converged = bool(g_max[i] < s.grad_tol)
    if not converged:
        log.warning("streaming probe: did NOT converge: largest gradient entry %.2g >= grad_tol "
                    "%g after %d epochs; raise epochs", g_max[i], s.grad_tol, s.epochs)  # fmt: skip
    return StreamingFit(
        classes=classes, heads=refit, index=i, c=chosen,
        c_final=scale_c(chosen, m_tr.n, f.n_rows), decay=decays[i], val_top1=val_top1,
        n_sweep=m_tr.n, n_final=f.n_rows, epochs=s.epochs, grad_max=float(g_max[i]),
        converged=converged, objective=history,
        seconds={"moments": t1 - t0, "train": t2 - t1, "check": time.perf_counter() - t2},
    )  # fmt: skip


def predict_file(
    fit: StreamingFit, path: str | Path, chunk_rows: int = 4096
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted labels, top-5 hit per row) of a feature file, streamed."""
    f = FeatureFile(path, chunk_rows)
    labels = f.labels()
    heads, device = fit.heads, fit.heads.w.device
    k = min(5, len(fit.classes))
    pred, top5 = np.empty(f.n_rows, fit.classes.dtype), np.empty(f.n_rows, bool)
    with torch.no_grad():
        for start, x in f.chunks():
            scores = heads.logits(as_tensor(x, device))[:, fit.index]
            top = fit.classes[scores.topk(k, dim=1).indices.cpu().numpy()]
            rows = slice(start, start + len(x))
            pred[rows] = top[:, 0]
            top5[rows] = (top == labels[rows, None]).any(1)
    return labels, pred, top5


def score_streaming_probe(
    fit: StreamingFit, test_path: str | Path, chunk_rows: int = 4096
) -> tuple[dict[str, float], np.ndarray]:
    """The sklearn probe's metrics (top1, top5, balanced accuracy, C, C_final, converged) plus
    probe_weight_decay, probe_epochs and probe_grad_max; probe_n_iter holds the epochs. Returns
    (metrics, test predictions)."""
    from sklearn.metrics import balanced_accuracy_score

    labels, pred, top5 = predict_file(fit, test_path, chunk_rows)
    return {
        "probe_top1": float((pred == labels).mean()),
        "probe_top5": float(top5.mean()),
        "probe_balanced_acc": float(balanced_accuracy_score(labels, pred)),
        "probe_C": fit.c,
        "probe_C_final": fit.c_final,
        "probe_n_iter": float(fit.epochs),
        "probe_converged": float(fit.converged),
        "probe_weight_decay": fit.decay,
        "probe_epochs": float(fit.epochs),
        "probe_grad_max": fit.grad_max,
        # No grid extension here (each C is a head trained in the same pass): an edge choice
        # is reported, and a wider c_grid is the remedy.
        **val_metrics(fit.val_top1, fit.c, edge_step(fit.val_top1) is not None),
    }, pred
