"""Linear probe and kNN on arrays: separable features, shuffled labels, C chosen without test,
the probe against an independent solver of the same objective, C scaling and convergence."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from evaluation.knn import knn_classify, knn_scores
from evaluation.probe import (
    ProbeSettings,
    best_c,
    fit_probe,
    probe,
    scale_c,
    score_probe,
    select_c,
    topk_accuracy,
)

FAST = ProbeSettings(c_grid=(0.001, 0.01, 0.1, 1.0), max_iter=100)


@pytest.fixture(autouse=True, scope="module")
def one_thread_blas():
    """Tiny fits gain nothing from BLAS/OpenMP threads, and on a shared 2-core machine thread
    barriers under contention turn milliseconds into seconds."""
    with threadpool_limits(1):
        yield


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around random centres: linearly separable when spread is small."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def test_probe_separates_separable_classes():
    x, y = blobs(60, 10, 32, 1.0, seed=0)
    xt, yt = blobs(40, 10, 32, 1.0, seed=1)
    metrics, pred = probe(x, y, xt, yt, FAST)
    assert metrics["probe_top1"] > 0.95
    assert metrics["probe_balanced_acc"] > 0.95
    assert metrics["probe_top5"] >= metrics["probe_top1"]
    assert metrics["probe_C"] in FAST.c_grid
    assert pred.shape == yt.shape and (pred == yt).mean() == pytest.approx(metrics["probe_top1"])


def test_probe_sits_at_chance_on_shuffled_labels():
    x, y = blobs(60, 10, 32, 1.0, seed=0)
    xt, yt = blobs(100, 10, 32, 1.0, seed=1)
    rng = np.random.default_rng(7)
    metrics, _ = probe(x, rng.permutation(y), xt, rng.permutation(yt), FAST)
    # 1000 test rows: chance is 0.10 with a standard deviation of about 0.01.
    assert 0.05 < metrics["probe_top1"] < 0.16
    assert 0.35 < metrics["probe_top5"] < 0.65


def test_c_is_chosen_on_train_only_whatever_the_test_set():
    # Three classes, class 0 the majority. Strong regularisation (tiny C) predicts the majority
    # class everywhere, so a test set of class-1/2 features all labelled 0 rewards the tiniest C:
    # a probe that selected C on test would pick 0.001 there and a larger C on honest test data.
    x, y = blobs(100, 3, 8, 1.5, seed=0)
    x = np.concatenate([x, blobs(200, 3, 8, 1.5, seed=2)[0][:200]])  # 200 extra class-0 rows
    y = np.concatenate([y, np.zeros(200, dtype=y.dtype)])
    honest_x, honest_y = blobs(50, 3, 8, 1.5, seed=1)
    adversarial_x, adversarial_y = honest_x[honest_y > 0], np.zeros((honest_y > 0).sum(), int)
    m_honest, _ = probe(x, y, honest_x, honest_y, FAST)
    m_adv, _ = probe(x, y, adversarial_x, adversarial_y, FAST)
    sweep = select_c(x, y, FAST)
    assert m_honest["probe_C"] == m_adv["probe_C"] == sweep.c
    assert set(sweep.val_top1) == set(FAST.c_grid)
    assert sweep.c > min(FAST.c_grid)
    # The adversarial test set really does prefer the tiniest C: selection on it would differ.
    tiny = fit_probe(x, y, ProbeSettings(c_grid=(0.001,), max_iter=100))
    assert (tiny.model.predict(adversarial_x) == 0).mean() > m_adv["probe_top1"] + 0.3


def test_probe_rejects_bad_features():
    x, y = blobs(10, 2, 4, 1.0, seed=0)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(x, y, FAST)
    with pytest.raises(ValueError, match="two classes"):
        fit_probe(x[:5], np.zeros(5, int), FAST)


def reference_softmax(z: np.ndarray, y: np.ndarray, reg: float, classes: int):
    """argmin of mean_i CE_i + reg/2 * ||W||^2 (intercepts unpenalised) by scipy L-BFGS-B in
    float64 to a tight tolerance: the probe's objective written out without scikit-learn."""
    n, d = z.shape
    onehot = np.eye(classes)[y]

    def loss_grad(theta):
        w, b = theta[: classes * d].reshape(classes, d), theta[classes * d :]
        logp = log_softmax(z @ w.T + b, axis=1)
        dlogits = (np.exp(logp) - onehot) / n
        loss = -(onehot * logp).sum() / n + 0.5 * reg * (w**2).sum()
        return loss, np.concatenate([(dlogits.T @ z + reg * w).ravel(), dlogits.sum(0)])

    opts = {"gtol": 1e-12, "ftol": 0.0, "maxiter": 20_000}
    res = minimize(loss_grad, np.zeros(classes * (d + 1)), jac=True, method="L-BFGS-B",
                   options=opts)  # fmt: skip
    return res.x[: classes * d].reshape(classes, d), res.x[classes * d :]


@pytest.mark.parametrize("tol, atol", [(1e-10, 1e-6), (ProbeSettings.tol, 2e-3)])
def test_probe_matches_an_independent_solver_of_its_objective(tol, atol):
    # Overlapping classes: a well-posed, non-separable problem whose optimum is unique.
    x, y = blobs(40, 3, 5, 3.0, seed=4)
    x = x.astype(np.float64)
    fit = fit_probe(x, y, ProbeSettings(c_grid=(0.3,), tol=tol, max_iter=10_000))
    assert fit.converged and fit.n_final == len(x)
    # The refit minimises mean loss + ||W||^2 / (2 C_final n) on standardised train features.
    z = (x - x.mean(0)) / x.std(0)
    w, b = reference_softmax(z, y, 1.0 / (fit.c_final * len(x)), classes=3)
    xt, _ = blobs(30, 3, 5, 3.0, seed=5)
    want = softmax(((xt - x.mean(0)) / x.std(0)) @ w.T + b, axis=1)
    np.testing.assert_allclose(fit.model.predict_proba(xt), want, atol=atol)
    np.testing.assert_allclose(fit.model["lr"].coef_, w, atol=atol * 10)


def test_chosen_c_is_the_argmax_of_independent_cold_fits():
    # Validation top-1 here is 0.85 at C=1e-3 and 0.90 from 1e-2 up: a tie, won by 1e-2.
    x, y = blobs(50, 4, 50, 6.0, seed=2)
    s = ProbeSettings(c_grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0), tol=1e-8, max_iter=10_000)
    # The same carved split, written out; every C fitted from scratch (no warm start).
    x_tr, x_val, y_tr, y_val = train_test_split(x, y, test_size=0.1, random_state=0, stratify=y)
    want = {}
    for c in s.c_grid:
        cold = LogisticRegression(C=c, tol=1e-10, max_iter=10_000)
        want[c] = make_pipeline(StandardScaler(), cold).fit(x_tr, y_tr).score(x_val, y_val)
    top = max(want.values())
    sweep = select_c(x, y, s)
    assert sweep.val_top1 == pytest.approx(want)
    assert sweep.c == min(c for c, acc in want.items() if acc == top)
    assert len(set(want.values())) > 1 and list(want.values()).count(top) > 1
    assert sweep.n_rows == len(x_tr) and all(r.converged for r in sweep.runs)


def test_ties_go_to_the_smaller_c_and_edges_are_logged(caplog):
    assert best_c({1.0: 0.5, 0.1: 0.5, 0.01: 0.3, 10.0: 0.5}) == 0.1
    assert best_c({1.0: 0.6, 0.1: 0.5}) == 1.0
    # Validation 1.0 at C=1e-3, 0.89 at 1e-2: the lower edge wins outright. Without extension
    # steps it stays there, reported (a tie with its neighbour would be no edge).
    x, y = blobs(30, 3, 6, 3.0, seed=0)
    with caplog.at_level(logging.WARNING, logger="evaluation.probe"):
        sweep = select_c(x, y, ProbeSettings(c_grid=(1e-3, 1e-2), extend_steps=0))
    assert "edge of the grid" in caplog.text and sweep.at_edge and sweep.c == 1e-3


def test_scale_c_keeps_the_per_sample_objective():
    assert scale_c(0.1, 100, 1000) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        scale_c(0.1, 0, 10)
    x, y = blobs(30, 3, 6, 3.0, seed=2)
    z = StandardScaler().fit_transform(x.astype(np.float64))
    z2, y2 = np.repeat(z, 2, axis=0), np.repeat(y, 2)

    def coef(c, zz, yy):
        return LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(zz, yy).coef_

    once = coef(0.5, z, y)
    # Every row twice at the scaled C (= C/2) is the same objective: the same coefficients.
    np.testing.assert_allclose(coef(scale_c(0.5, len(z), len(z2)), z2, y2), once, atol=1e-6)
    # Unscaled, the same C on twice the rows regularises half as much: a different fit.
    assert np.abs(coef(0.5, z2, y2) - once).max() > 1e-2


def test_refit_uses_the_c_scaled_to_its_rows():
    x, y = blobs(50, 3, 6, 3.0, seed=2)  # 150 rows; the sweep trains on the 135 carved ones
    fit = fit_probe(x, y, ProbeSettings(c_grid=(0.2,)))
    assert (fit.n_sweep, fit.n_final) == (135, 150)
    assert fit.c == 0.2 and fit.c_final == pytest.approx(0.2 * 135 / 150)
    assert fit.model["lr"].C == fit.c_final == fit.final.c
    metrics = score_probe(fit, x, y)
    assert metrics["probe_C"] == 0.2 and metrics["probe_C_final"] == fit.c_final
    # An explicit sweep subsample: C chosen on its 60 rows, scaled from 60.
    sub = fit_probe(x, y, ProbeSettings(c_grid=(0.2,), sweep_max_samples=60))
    assert sub.n_sweep == 60 and sub.c_final == pytest.approx(0.2 * 60 / 150)


def test_convergence_is_recorded_and_a_truncated_fit_is_logged(caplog):
    x, y = blobs(50, 3, 6, 3.0, seed=2)
    with caplog.at_level(logging.WARNING, logger="evaluation.probe"):
        short = fit_probe(x, y, ProbeSettings(c_grid=(10.0,), max_iter=2))
    metrics = score_probe(short, x, y)
    assert metrics["probe_converged"] == 0.0 and metrics["probe_n_iter"] == 2
    assert "final refit did NOT converge" in caplog.text and "max_iter=2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evaluation.probe"):
        full = fit_probe(x, y, ProbeSettings(c_grid=(10.0,)))
    metrics = score_probe(full, x, y)
    assert metrics["probe_converged"] == 1.0 and 0 < metrics["probe_n_iter"] < 100
    assert all(r.converged for r in full.sweep_runs)
    assert "converge" not in caplog.text


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    y = np.array([2, 2])
    classes = np.array([0, 1, 2])
    assert topk_accuracy(scores, y, classes, 1) == 0.0
    assert topk_accuracy(scores, y, classes, 2) == 0.5
    assert topk_accuracy(scores, y, classes, 5) == 1.0


def brute_force_knn(xtr, ytr, xte, k, t, classes):
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    out = np.zeros((len(xte), classes))
    for i, row in enumerate(b @ a.T):
        for j in np.argsort(-row)[:k]:
            out[i, ytr[j]] += np.exp(row[j] / t)
    return out


def test_knn_matches_a_brute_force_dino_vote():
    rng = np.random.default_rng(0)
    xtr, ytr = rng.normal(size=(200, 6)).astype(np.float32), rng.integers(0, 4, 200)
    xte = rng.normal(size=(30, 6)).astype(np.float32)
    got = knn_scores(xtr, ytr, xte, num_classes=4, k=20, temperature=0.07, chunk=7)
    want = brute_force_knn(xtr, ytr, xte, 20, 0.07, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_knn_accuracy_on_clusters_and_chance():
    x, y = blobs(50, 10, 16, 1.0, seed=0)
    xt, yt = blobs(30, 10, 16, 1.0, seed=1)
    good = knn_classify(x, y, xt, yt, num_classes=10)
    assert good["knn_top1"] > 0.95 and good["knn_top5"] >= good["knn_top1"]
    rng = np.random.default_rng(3)
    bad = knn_classify(x, rng.permutation(y), xt, yt, num_classes=10)
    assert bad["knn_top1"] < 0.2


def test_val_metrics_report_the_chosen_c_and_nan_without_a_sweep():
    """A swept fit reports top-1 at its C and at every C; a fixed-C fit (gpu_check's and
    bench_streaming_probe's heads) saw no validation and must not fail on it."""
    import math

    from evaluation.probe import val_metrics

    swept = val_metrics({0.1: 0.5, 1.0: 0.7}, 1.0, True)
    assert swept["probe_val_top1"] == 0.7 and swept["probe_C_at_edge"] == 1.0
    assert swept["probe_val_top1_C_0.1"] == 0.5 and swept["probe_val_top1_C_1"] == 0.7
    fixed = val_metrics({}, 1.0, False)
    assert math.isnan(fixed["probe_val_top1"]) and fixed["probe_C_at_edge"] == 0.0
