"""Linear probe on frozen features: StandardScaler + multinomial LogisticRegression.

Pure functions on arrays. The regularisation C is chosen on a validation split carved from the
training features only: `fit_probe` never sees test data, so nothing can select on it. The
chosen C is then refit on train + validation, as in the usual linear-evaluation protocol.

Two things make the numbers mean what they say:

* Regularisation per sample. scikit-learn minimises ½||w||² + C·Σ_i loss_i, i.e.
  mean_i loss_i + ||w||² / (2·C·n): one C regularises less per sample the more rows it is fitted
  on. The sweep picks C on n_sweep rows, and the refit on n_final rows uses
  `scale_c(C, n_sweep, n_final)` so that the objective per sample, the thing validation chose,
  is unchanged. By default the sweep fits on the whole carved train part (90 % of train), so C
  is chosen at nearly the size of the final fit.
* A grid that finds the optimum. When validation picks a C at an edge of the grid, the grid is
  extended by half-decades (x sqrt(10)) in that direction until validation accuracy falls, at
  most `extend_steps` times; a choice still at an edge after that is reported
  (`probe_C_at_edge` = 1), as the optimum may lie further out.
* Few labels. Below `cv_below` training rows a single carve leaves too few validation images to
  choose by (500 images, 10 %: 50, i.e. 5 a class, a standard error of ~7 points), so C is
  chosen by stratified `cv_folds`-fold cross-validation: every training row is scored once.
* Convergence. Every lbfgs fit records its iterations and whether it reached `tol` before
  `max_iter`; a fit that did not is logged as a warning and reported (`probe_converged` = 0), so
  a truncated solver can never pass silently for a probe result.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.progress import tracked

log = logging.getLogger(__name__)

# C at the sweep's size (45,000 carved train rows for CIFAR-10), half a decade apart. Measured
# on CIFAR-10 conv3 (random init, 4096-d, tol 1e-4): validation top-1 0.491 / 0.517 / 0.533 /
# 0.531 / 0.525 at C = 1e-4 / 3e-4 / 1e-3 / 3e-3 / 1e-2, so three points bracket the top, and
# each one more is a full-size lbfgs fit (130-240 iterations warm-started), the costliest step
# of the protocol. A choice at an edge extends the grid (ProbeSettings.extend_steps).
DEFAULT_C_GRID: tuple[float, ...] = (0.0003, 0.001, 0.003)
HALF_DECADE = math.sqrt(10.0)  # the grid extension's step


@dataclass(frozen=True)
class ProbeSettings:
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    val_fraction: float = 0.1  # share of train carved off (stratified) to choose C
    # The C sweep fits on at most this many rows of the carved train part (0 = all of it). A
    # subsample is cheaper but chooses the regularisation of a smaller problem: on CIFAR-10
    # conv3 a 15k-row sweep chose 3x more per-sample regularisation than the 45k one and lost
    # 1.6 points of test top-1 (0.527 vs 0.543).
    sweep_max_samples: int = 0
    # lbfgs iteration cap per fit: a safety net, not a budget. CIFAR-10 conv3 (45k x 4096,
    # tol 1e-4) took 130-240 iterations per C of the ascending sweep and ~120 for the refit;
    # a fit that reaches the cap is reported as not converged.
    max_iter: int = 1000
    # lbfgs stops when the largest gradient entry of the per-sample objective is below tol
    # (scikit-learn's default). On CIFAR-10 conv3 at C=1e-3, going on from 1e-4 to 1e-6
    # changed no validation prediction (1e-3 -> 1e-4 changed 0.6 % of them).
    tol: float = 1e-4
    # BLAS threads for the sweep and refit (0 = the library's default, all cores). On the
    # 2-core machine the full CIFAR-10 fit took 234 s with both cores and 271 s with one when
    # it was quiet; but with a 2-worker training beside it one 45k x 4096 loss + gradient took
    # 0.33-0.43 s on one thread and 1.7-6 s on two (OpenBLAS threads spin), so set 1 there.
    blas_threads: int = 0
    seed: int = 0
    # Half-decade steps the grid may grow beyond each edge (0 = the grid as given). Every probe
    # of CIFAR-10 conv layers chose the top of (3e-4, 1e-3, 3e-3) before this existed.
    extend_steps: int = 3
    # Below this many training rows, C is chosen by stratified k-fold cross-validation instead
    # of one carve (see the module docstring); the refit then starts from zero. 0 = always one
    # carve (the probe job's default); the benchmark sets 2000 (its 1 % label fraction).
    cv_below: int = 0
    cv_folds: int = 5
    # The rows `c_grid` is stated at (0 = as given): the grid is scaled to the sweep's own rows
    # (`scale_c`), so one grid means the same per-sample regularisation on 500 rows as on
    # 45,000 (label-efficiency probes).
    grid_rows: int = 0
    # Refit on train + val at the chosen C. False: the sweep's own fit at the chosen C (on the
    # carved train part) is the probe, one lbfgs fit fewer (cross-validation always refits).
    refit: bool = True

    def __post_init__(self) -> None:
        if self.extend_steps < 0 or self.cv_folds < 2 or not 0 < self.val_fraction < 1:
            raise ValueError(f"ProbeSettings: need extend_steps >= 0, cv_folds >= 2 and "
                             f"0 < val_fraction < 1, got {self}")  # fmt: skip


@dataclass(frozen=True)
class SolverRun:
    """One lbfgs fit: its C, rows, iterations, whether it converged within max_iter, time."""

    c: float
    n_rows: int
    n_iter: int
    converged: bool
    seconds: float


@dataclass(frozen=True)
class Sweep:
    """The C sweep on the carved split: the chosen C and what every C scored and cost."""

    c: float  # the chosen grid C, at `n_rows` rows
    val_top1: dict[float, float]  # C -> validation top-1 (extension included)
    runs: tuple[SolverRun, ...]  # one per C (and fold), in the order fitted
    n_rows: int  # rows each sweep fit was trained on
    coef: np.ndarray | None  # the chosen C's solution, which warm-starts the refit (carve only)
    intercept: np.ndarray | None
    seconds: float
    at_edge: bool = False  # the choice is still at an edge after the extension
    n_val: int = 0  # validation predictions behind each score
    method: str = "carve"  # "carve" (one stratified split) or "cv<k>"
    scaler: StandardScaler | None = None  # the carve's scaler (the probe when refit=False)


@dataclass
class ProbeFit:
    """A fitted probe: the pipeline refit on train + val with `c_final`, and the sweep behind
    it."""

    model: Pipeline
    c: float  # the chosen grid C (regularisation chosen at the sweep's `n_sweep` rows)
    val_top1: dict[float, float] = field(default_factory=dict)  # C -> validation top-1
    c_final: float = float("nan")  # scale_c(c, n_sweep, n_final): C of the refit
    n_sweep: int = 0
    n_final: int = 0
    final: SolverRun | None = None  # the refit
    sweep_runs: tuple[SolverRun, ...] = ()
    sweep_seconds: float = 0.0
    refit_seconds: float = 0.0
    at_edge: bool = False  # chosen C still at an edge of the extended grid
    n_val: int = 0
    method: str = "carve"

    @property
    def val_at_c(self) -> float:
        """Validation top-1 at the chosen C."""
        return self.val_top1[self.c]

    @property
    def converged(self) -> bool:
        """True when every fit behind the numbers, sweep and refit, reached tol."""
        runs = (*self.sweep_runs, *((self.final,) if self.final else ()))
        return all(r.converged for r in runs)


def scale_c(c: float, n_from: int, n_to: int) -> float:
    """The C on `n_to` rows with the same per-sample objective as `c` on `n_from` rows.

    scikit-learn's LogisticRegression minimises ½||w||² + C·Σ_i loss_i, which divided by C·n is
    mean_i loss_i + ||w||² / (2·C·n): the per-sample regularisation is 1 / (C·n). Keeping it
    fixed from n_from to n_to rows needs C·n fixed, i.e. C · n_from / n_to. (Reusing C unchanged
    on 10x the rows would regularise 10x less per sample than validation chose.)
    """
    if c <= 0 or n_from <= 0 or n_to <= 0:
        raise ValueError(f"scale_c needs positive c and row counts, got {c}, {n_from}, {n_to}")
    return c * n_from / n_to


def _logistic(c: float, s: ProbeSettings) -> LogisticRegression:
    # lbfgs fits the multinomial (softmax) loss for >2 classes, the protocol's "multinomial LR".
    # warm_start: each fit starts from the previous solution. The problem is strictly convex,
    # so the optimum is the same as from zero; only the path there is shorter.
    return LogisticRegression(C=c, solver="lbfgs", max_iter=s.max_iter, tol=s.tol, warm_start=True)


def _solve(lr: LogisticRegression, z: np.ndarray, y: np.ndarray, what: str) -> SolverRun:
    """Fit `lr` on standardised `z` and record it. Converged means lbfgs reported success
    (gradient below tol, or no further decrease at float precision) within max_iter, i.e.
    scikit-learn raised no ConvergenceWarning; a fit that did not is logged as a warning."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr.fit(z, y)
    seconds = time.perf_counter() - t0
    for w in caught:  # other warnings pass through; ConvergenceWarning becomes the log below
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    n_iter = int(np.max(lr.n_iter_))
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    run = SolverRun(
        c=float(lr.C),
        n_rows=len(z),
        n_iter=n_iter,
        converged=not warned and n_iter < lr.max_iter,
        seconds=seconds,
    )
    if not run.converged:
        log.warning(
            "probe: %s did NOT converge: lbfgs stopped after %d iterations (max_iter=%d, "
            "tol=%g) with C=%g on %d rows; its accuracy is not that of the optimum",
            what, n_iter, lr.max_iter, lr.tol, run.c, run.n_rows,
        )  # fmt: skip
    return run


def _blas(s: ProbeSettings) -> AbstractContextManager:
    """Scope the BLAS thread count of the sweep and the refit (see `blas_threads`)."""
    return threadpool_limits(s.blas_threads, user_api="blas") if s.blas_threads else nullcontext()


def _check_inputs(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"probe expects x (N, D) and y (N,), got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("probe needs at least two classes in the training labels")
    if not np.isfinite(x).all():
        raise ValueError("probe features contain NaN or inf")


def carve_validation(
    x: np.ndarray, y: np.ndarray, s: ProbeSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_tr, x_val, y_tr, y_val): stratified split of the *training* features (fixed seed),
    the tr part subsampled to `s.sweep_max_samples` rows when that is set."""
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=s.val_fraction, random_state=s.seed, stratify=stratify
    )
    if 0 < s.sweep_max_samples < len(x_tr):
        idx = np.sort(
            np.random.default_rng(s.seed).choice(len(x_tr), s.sweep_max_samples, replace=False)
        )
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    return x_tr, x_val, y_tr, y_val


def best_c(val_top1: dict[float, float]) -> float:
    """The C with the highest validation top-1; ties go to the smaller (more regularised) C."""
    return min(val_top1, key=lambda c: (-val_top1[c], c))


def search_c(
    score: Callable[[float], float], grid: Sequence[float], extend_steps: int
) -> tuple[float, dict[float, float], bool]:
    """Score `grid` (ascending), then while validation still rises towards an edge, score one
    half-decade beyond it, at most `extend_steps` times: (chosen C, C -> score, at an edge).

    Stops as soon as the new C scores below the best (the optimum is bracketed). Ties go to the
    smaller C (`best_c`), and a flat end is no edge: a smallest C that only ties its neighbour
    (a saturated validation score) is not extended. `score` sees only C: whatever it evaluates
    on is the caller's validation data."""
    scores = {c: score(c) for c in sorted(set(grid))}
    for _ in range(extend_steps):
        step = edge_step(scores)
        if step is None:
            break
        nxt = best_c(scores) * step
        scores[nxt] = score(nxt)
    return best_c(scores), scores, edge_step(scores) is not None


def edge_step(scores: dict[float, float]) -> float | None:
    """x sqrt(10) when the best C is the largest, / sqrt(10) when it is the smallest and beats
    the next one, else None (the optimum is inside the grid, or the grid has one C)."""
    cs = sorted(scores)
    if len(cs) < 2:
        return None
    chosen = best_c(scores)
    if chosen == cs[-1]:  # ties go to the smaller C, so the largest won outright
        return HALF_DECADE
    if chosen == cs[0] and scores[cs[0]] > scores[cs[1]]:
        return 1 / HALF_DECADE
    return None


def select_c(
    x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings = ProbeSettings()
) -> Sweep:
    """Sweep C on the carved train part (or by cross-validation below `cv_below` rows), scored
    on validation rows of the training features, extending the grid at an edge (`search_c`).

    Only the training features enter. Ties go to the smaller C; a choice still at an edge after
    the extension is logged, as the best C may lie beyond it.
    """
    with _blas(settings):
        if len(x_train) < settings.cv_below:
            sweep = _cv_sweep(x_train, y_train, settings)
        else:
            sweep = _sweep(x_train, y_train, settings)
    if sweep.at_edge:
        log.warning("probe: chosen C=%g is still at the edge of the grid %s after %d extension "
                    "steps", sweep.c, sorted(sweep.val_top1), settings.extend_steps)  # fmt: skip
    return sweep


def grid_for(settings: ProbeSettings, n_rows: int) -> list[float]:
    """The C grid at `n_rows` sweep rows (`grid_rows` scaling, see ProbeSettings)."""
    if not settings.grid_rows:
        return sorted(set(settings.c_grid))
    return sorted({scale_c(c, settings.grid_rows, n_rows) for c in settings.c_grid})


def _nearest(solutions: dict, c: float):
    return solutions[min(solutions, key=lambda k: abs(math.log(k / c)))]


def _sweep(x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings) -> Sweep:
    t0 = time.perf_counter()
    x_tr, x_val, y_tr, y_val = carve_validation(x_train, y_train, settings)
    scaler = StandardScaler().fit(x_tr)
    z_tr, z_val = scaler.transform(x_tr), scaler.transform(x_val)
    del x_tr, x_val  # float32 copies of up to 45k x 4096: free them before the fits
    lr = _logistic(1.0, settings)
    runs: list[SolverRun] = []
    solutions: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def score(c: float) -> float:
        # Warm start from the nearest C fitted so far: the weights grow with C, so the closest
        # solution is the shortest path (an ascending grid, then the extension outwards).
        if solutions:
            lr.coef_, lr.intercept_ = (a.copy() for a in _nearest(solutions, c))
        lr.set_params(C=c)
        runs.append(_solve(lr, z_tr, y_tr, f"C sweep fit C={c:g}"))
        solutions[c] = (lr.coef_.copy(), lr.intercept_.copy())
        return float((lr.predict(z_val) == y_val).mean())

    chosen, scores, at_edge = search_c(score, grid_for(settings, len(z_tr)), settings.extend_steps)
    coef, intercept = solutions[chosen]
    return Sweep(
        c=chosen, val_top1=scores, runs=tuple(runs), n_rows=len(z_tr), coef=coef,
        intercept=intercept, seconds=time.perf_counter() - t0, at_edge=at_edge,
        n_val=len(y_val), method="carve", scaler=scaler,
    )  # fmt: skip


def _cv_sweep(x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings) -> Sweep:
    """C by stratified k-fold cross-validation: the score of a C is the share of all training
    rows predicted right by the fold model that did not see them."""
    t0 = time.perf_counter()
    _, counts = np.unique(y_train, return_counts=True)
    k = max(2, min(settings.cv_folds, int(counts.min())))
    folds = []
    for tr, va in StratifiedKFold(k, shuffle=True, random_state=settings.seed).split(
        x_train, y_train
    ):
        scaler = StandardScaler().fit(x_train[tr])
        z_tr, z_va = scaler.transform(x_train[tr]), scaler.transform(x_train[va])
        folds.append((z_tr, y_train[tr], z_va, y_train[va], _logistic(1.0, settings)))
    runs: list[SolverRun] = []

    def score(c: float) -> float:
        correct = 0
        for i, (z_tr, y_tr, z_va, y_va, lr) in enumerate(folds):
            lr.set_params(C=c)  # warm-started from this fold's previous C
            runs.append(_solve(lr, z_tr, y_tr, f"C cross-validation fold {i} C={c:g}"))
            correct += int((lr.predict(z_va) == y_va).sum())
        return correct / len(y_train)

    n_rows = len(folds[0][0])
    chosen, scores, at_edge = search_c(score, grid_for(settings, n_rows), settings.extend_steps)
    return Sweep(
        c=chosen, val_top1=scores, runs=tuple(runs), n_rows=n_rows, coef=None, intercept=None,
        seconds=time.perf_counter() - t0, at_edge=at_edge, n_val=len(y_train), method=f"cv{k}",
    )  # fmt: skip


def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings = ProbeSettings()
) -> ProbeFit:
    """Choose C on validation rows of train (`select_c`), then refit on all of train
    (train + val) with that C scaled to the refit's rows (`scale_c`); with `refit=False` the
    sweep's own fit at the chosen C is the probe.

    Only training features and labels enter; test data cannot influence C by construction.
    """
    _check_inputs(x_train, y_train)
    sweep = select_c(x_train, y_train, settings)
    common = dict(
        c=sweep.c, val_top1=sweep.val_top1, n_sweep=sweep.n_rows, sweep_runs=sweep.runs,
        sweep_seconds=sweep.seconds, at_edge=sweep.at_edge, n_val=sweep.n_val,
        method=sweep.method,
    )  # fmt: skip
    if not settings.refit and sweep.coef is not None:
        lr = _logistic(sweep.c, settings)
        lr.classes_, lr.coef_, lr.intercept_ = np.unique(y_train), sweep.coef, sweep.intercept
        model = Pipeline([("scale", sweep.scaler), ("lr", lr)])
        return ProbeFit(model=model, c_final=sweep.c, n_final=sweep.n_rows, **common)
    with _blas(settings):
        t0 = time.perf_counter()
        c_final = scale_c(sweep.c, sweep.n_rows, len(x_train))
        scaler = StandardScaler().fit(x_train)
        lr = _logistic(c_final, settings)
        if sweep.coef is not None:
            # Warm start from the sweep's solution: the same per-sample objective on 10 % more
            # rows (and a scaler refit on them), so its optimum is close.
            lr.coef_, lr.intercept_ = sweep.coef.copy(), sweep.intercept.copy()
        for _ in tracked([c_final], desc="probe refit", unit="fit"):  # often the longest fit
            final = _solve(lr, scaler.transform(x_train), y_train, "final refit")
    return ProbeFit(
        model=Pipeline([("scale", scaler), ("lr", lr)]), c_final=c_final, n_final=len(x_train),
        final=final, refit_seconds=time.perf_counter() - t0, **common,
    )  # fmt: skip


def topk_accuracy(scores: np.ndarray, y: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the k highest-scoring classes."""
    k = min(k, scores.shape[1])
    top = classes[np.argsort(-scores, axis=1)[:, :k]]
    return float((top == y[:, None]).any(axis=1).mean())


def score_probe(fit: ProbeFit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Top-1, top-5, balanced accuracy on the test features, plus how the probe was fitted:
    probe_C (chosen grid C), probe_C_final (its scaled refit C), probe_n_iter (refit lbfgs
    iterations) and probe_converged (1.0 when every sweep fit and the refit reached tol)."""
    proba = fit.model.predict_proba(x_test)
    classes = fit.model.classes_
    pred = classes[proba.argmax(axis=1)]
    return {
        "probe_top1": float((pred == y_test).mean()),
        "probe_top5": topk_accuracy(proba, y_test, classes, 5),
        "probe_balanced_acc": float(balanced_accuracy_score(y_test, pred)),
        "probe_C": fit.c,
        "probe_C_final": fit.c_final,
        "probe_n_iter": float(fit.final.n_iter) if fit.final else float("nan"),
        "probe_converged": float(fit.converged),
        **val_metrics(fit.val_top1, fit.c, fit.at_edge),
    }


def val_metrics(val_top1: dict[float, float], c: float, at_edge: bool) -> dict[str, float]:
    """What validation saw: top-1 at the chosen C, whether C is still at the grid's edge, and
    top-1 at every C tried (`probe_val_top1_C_<C>`). A fit at a given C, with no sweep (the
    benchmarks' fixed-C heads), saw no validation: NaN."""
    out = {"probe_val_top1": val_top1.get(c, float("nan")), "probe_C_at_edge": float(at_edge)}
    out |= {f"probe_val_top1_C_{k:.3g}": v for k, v in sorted(val_top1.items())}
    return out


def predict(fit: ProbeFit, x: np.ndarray) -> np.ndarray:
    """Predicted labels (for confusion matrices)."""
    return fit.model.predict(x)


def probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    settings: ProbeSettings = ProbeSettings(),
) -> tuple[dict[str, float], np.ndarray]:
    """fit_probe on train, score on test: (metrics, test predictions)."""
    fit = fit_probe(x_train, y_train, settings)
    return score_probe(fit, x_test, y_test), predict(fit, x_test)


def c_grid_from(values: Sequence[float]) -> tuple[float, ...]:
    """Validate a user-supplied C grid (positive, non-empty)."""
    grid = tuple(float(v) for v in values)
    if not grid or any(v <= 0 for v in grid):
        raise ValueError(f"C grid must be non-empty and positive, got {list(values)}")
    return grid
