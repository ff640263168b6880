"""Linear probe on frozen features: StandardScaler + multinomial LogisticRegression.

Pure functions on arrays. The regularisation C is chosen on a validation split carved from the
training features only: `fit_probe` never sees test data, so nothing can select on it. The
chosen C is then refit on train + validation, as in the usual linear-evaluation protocol.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

# A small log grid: each extra C is one more lbfgs fit in the costliest step of the protocol.
# Standardised features of a few thousand dimensions swept on ~5k rows have wanted the small
# end (random-init CIFAR-10 conv3 features: 0.001 won over 0.01..1), so the grid reaches 1e-4.
DEFAULT_C_GRID: tuple[float, ...] = (0.0001, 0.001, 0.01, 0.1, 1.0)


@dataclass(frozen=True)
class ProbeSettings:
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    val_fraction: float = 0.1  # share of train carved off (stratified) to choose C
    # The C sweep fits on at most this many train rows (0 = all): the sweep only has to rank
    # the Cs, and its cost is linear in rows.
    sweep_max_samples: int = 5_000
    # lbfgs iterations per fit. On CIFAR-10 pixels top-1 moved < 0.5 % between 50 and 200
    # iterations while the cost is linear in them; warm starts make the later fits short.
    max_iter: int = 50
    seed: int = 0


@dataclass
class ProbeFit:
    """A fitted probe: the pipeline refit on train + val with `c`, and the sweep behind it."""

    model: Pipeline
    # The chosen C, used unchanged for the refit on train + val. sklearn's C scales the summed
    # data loss, so the same C on more rows regularises a little less, as more data warrants.
    c: float
    val_top1: dict[float, float] = field(default_factory=dict)  # C -> validation top-1


def _pipeline(c: float, max_iter: int) -> Pipeline:
    # lbfgs fits the multinomial (softmax) loss for >2 classes, the protocol's "multinomial LR".
    lr = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, warm_start=True)
    return Pipeline([("scale", StandardScaler()), ("lr", lr)])


def _fit(pipe: Pipeline, x: np.ndarray, y: np.ndarray) -> Pipeline:
    # A probe at max_iter that has not fully converged is still a fair, comparable probe;
    # silence the warning rather than flood the log once per C and layer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pipe.fit(x, y)


def _check_inputs(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"probe expects x (N, D) and y (N,), got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("probe needs at least two classes in the training labels")
    if not np.isfinite(x).all():
        raise ValueError("probe features contain NaN or inf")


def _carve_validation(
    x: np.ndarray, y: np.ndarray, s: ProbeSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val split of the *training* features (fixed seed)."""
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    return train_test_split(x, y, test_size=s.val_fraction, random_state=s.seed, stratify=stratify)


def _subset(x: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n <= 0 or len(x) <= n:
        return x, y
    idx = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return x[np.sort(idx)], y[np.sort(idx)]


def select_c(
    x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings = ProbeSettings()
) -> tuple[float, dict[float, float], Pipeline]:
    """Sweep C (ascending, warm-started) on a split of the training data only.

    Returns (best C, {C: validation top-1}, the pipeline fitted at the best C on the sweep
    subset, whose coefficients warm-start the final refit). Ties go to the smaller C.
    """
    x_tr, x_val, y_tr, y_val = _carve_validation(x_train, y_train, settings)
    x_tr, y_tr = _subset(x_tr, y_tr, settings.sweep_max_samples, settings.seed)
    pipe = _pipeline(min(settings.c_grid), settings.max_iter)
    scores: dict[float, float] = {}
    best_c, best_acc, best_coef = None, -1.0, None
    # Ascending C: each fit starts from the previous, more regularised solution (warm_start).
    for c in sorted(settings.c_grid):
        pipe.set_params(lr__C=c)
        _fit(pipe, x_tr, y_tr)
        acc = float((pipe.predict(x_val) == y_val).mean())
        scores[c] = acc
        if acc > best_acc:
            best_c, best_acc = c, acc
            best_coef = (pipe["lr"].coef_.copy(), pipe["lr"].intercept_.copy())
    if len(scores) > 1 and best_c in (min(scores), max(scores)):
        log.warning("probe: chosen C=%g is at the edge of the grid %s", best_c, sorted(scores))
    pipe.set_params(lr__C=best_c)
    pipe["lr"].coef_, pipe["lr"].intercept_ = best_coef
    return float(best_c), scores, pipe


def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, settings: ProbeSettings = ProbeSettings()
) -> ProbeFit:
    """Choose C on a validation split of train, then refit on all of train (train + val).

    Only training features and labels enter; test data cannot influence C by construction.
    """
    _check_inputs(x_train, y_train)
    c, scores, pipe = select_c(x_train, y_train, settings)
    # Refit scaler + LR on train + val; the LR warm-starts from the sweep's best coefficients.
    _fit(pipe, x_train, y_train)
    return ProbeFit(model=pipe, c=c, val_top1=scores)


def topk_accuracy(scores: np.ndarray, y: np.ndarray, classes: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the k highest-scoring classes."""
    k = min(k, scores.shape[1])
    top = classes[np.argsort(-scores, axis=1)[:, :k]]
    return float((top == y[:, None]).any(axis=1).mean())


def score_probe(fit: ProbeFit, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """Top-1, top-5, balanced accuracy on the test features, plus the chosen C."""
    proba = fit.model.predict_proba(x_test)
    classes = fit.model.classes_
    pred = classes[proba.argmax(axis=1)]
    return {
        "probe_top1": float((pred == y_test).mean()),
        "probe_top5": topk_accuracy(proba, y_test, classes, 5),
        "probe_balanced_acc": float(balanced_accuracy_score(y_test, pred)),
        "probe_C": fit.c,
    }


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
