"""Linear probe and kNN on arrays: separable features, shuffled labels, C chosen without test."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.knn import knn_classify, knn_scores
from evaluation.probe import ProbeSettings, fit_probe, probe, select_c, topk_accuracy

FAST = ProbeSettings(c_grid=(0.001, 0.01, 0.1, 1.0), max_iter=100)


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
    c_val, scores, _ = select_c(x, y, FAST)
    assert m_honest["probe_C"] == m_adv["probe_C"] == c_val
    assert set(scores) == set(FAST.c_grid)
    assert c_val > min(FAST.c_grid)
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
