"""Streaming linear probe on real Parquet files written by evaluation.cache: moments against
numpy, the solution against scikit-learn's on the same objective, C chosen on the train carve
only, and reads that never ask for more than chunk_rows rows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from evaluation import cache
from evaluation.cache import Features
from evaluation.probe import ProbeSettings, carve_validation, fit_probe, scale_c, score_probe
from evaluation.protocol import ProtocolSettings
from evaluation.streaming_probe import (
    FeatureFile,
    StreamingSettings,
    carve,
    feature_moments,
    fit_streaming_probe,
    lr_at,
    score_streaming_probe,
)

GRID = (0.01, 0.1, 1.0)
# 20 epochs of 11 steps: the largest refit gradient entry ends near 6e-3 and the weights
# within 3 % of sklearn's optimum (15 epochs of batch 64: 12 %).
FAST = StreamingSettings(
    c_grid=GRID, epochs=20, batch_size=32, lr=1e-2, chunk_rows=100, shuffle_chunks=2,
    grad_tol=1e-2,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def quiet_threads(one_thread):
    """Tiny fits gain nothing from threads (conftest's torch fixture, plus BLAS for sklearn)."""
    with threadpool_limits(1):
        yield


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(classes, dim)) * 1.5
    y = rng.permutation(np.repeat(np.arange(classes), n_per_class))
    x = centres[y] + spread * rng.normal(size=(len(y), dim)) + 5.0  # off-centre: scaling matters
    return x.astype(np.float32), y.astype(np.int64)


def write(path, x, y):
    keys = np.array([f"k{i:06d}" for i in range(len(y))], dtype=object)
    return cache.save(Features(keys=keys, labels=y, x=x), path)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    x, y = blobs(100, 4, 12, 2.0, seed=0)
    xt, yt = blobs(100, 4, 12, 2.0, seed=1)
    train, test = write(d / "train.parquet", x, y), write(d / "test.parquet", xt, yt)
    return {"x": x, "y": y, "xt": xt, "yt": yt, "train": train, "test": test}


@pytest.fixture(scope="module")
def fitted(problem):
    return fit_streaming_probe(problem["train"], FAST)


def test_moments_match_numpy_per_group_and_merged(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(530, 7)) * [1, 10, 0.1, 1, 1, 1, 1] + 1000).astype(np.float32)
    x[:, 3] = 4.0  # constant feature: std 1, as StandardScaler
    y = np.zeros(len(x), np.int64)
    path = write(tmp_path / "m.parquet", x, y)
    groups = rng.integers(0, 2, len(x))
    a, b = feature_moments(FeatureFile(path, chunk_rows=64), groups, 2)
    for m, rows in ((a, x[groups == 0]), (b, x[groups == 1]), (a.merge(b), x)):
        ref = StandardScaler().fit(rows.astype(np.float64))
        assert m.n == len(rows)
        np.testing.assert_allclose(m.mean, rows.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(m.std, ref.scale_, rtol=1e-9)
    assert a.std[3] == 1.0


def test_matches_sklearn_probe_on_separable_blobs(problem, fitted):
    settings = ProbeSettings(c_grid=GRID, max_iter=500)
    sk = score_probe(fit_probe(problem["x"], problem["y"], settings), problem["xt"], problem["yt"])
    st, pred = score_streaming_probe(fitted, problem["test"])
    assert 0.6 < sk["probe_top1"] < 1.0  # overlapping classes: the probes could disagree
    assert abs(st["probe_top1"] - sk["probe_top1"]) <= 0.02
    assert st["probe_top5"] == pytest.approx(1.0)  # 4 classes
    assert (pred == problem["yt"]).mean() == pytest.approx(st["probe_top1"])
    assert st["probe_C"] in GRID and st["probe_converged"] == 1.0


def test_weights_are_sklearns_optimum_at_the_same_per_sample_decay(problem, fitted):
    # Same objective: mean CE + ||W||² / (2 C n) on standardised features, intercept free.
    assert fitted.decay == pytest.approx(1 / (fitted.c * fitted.n_sweep))
    assert fitted.c_final == pytest.approx(scale_c(fitted.c, fitted.n_sweep, len(problem["y"])))
    z = StandardScaler().fit_transform(problem["x"].astype(np.float64))
    lr = LogisticRegression(C=fitted.c_final, tol=1e-8, max_iter=2000).fit(z, problem["y"])
    heads = fitted.heads
    w = heads.w.detach().view(-1, heads.k, heads.c)[:, fitted.index].numpy().T  # (C, D)
    scale = np.abs(lr.coef_).max()
    assert np.abs(w - lr.coef_).max() < 0.08 * scale
    assert fitted.grad_max < FAST.grad_tol


def test_c_comes_from_the_train_carve_never_from_test(problem, fitted, tmp_path):
    # The carve is the sklearn probe's, row for row.
    y = problem["y"]
    is_val = carve(y, FAST)
    _, x_val, _, _ = carve_validation(problem["x"], y, ProbeSettings(val_fraction=0.1, seed=0))
    np.testing.assert_array_equal(np.sort(problem["x"][is_val], axis=0), np.sort(x_val, axis=0))
    # A test file with shuffled labels changes the score, never the choice.
    fit = fitted
    wrong = np.random.default_rng(3).permutation(problem["yt"])
    shuffled = write(tmp_path / "t.parquet", problem["xt"], wrong)
    honest, _ = score_streaming_probe(fit, problem["test"])
    other, _ = score_streaming_probe(fit, shuffled)
    assert other["probe_top1"] < honest["probe_top1"] - 0.3
    assert other["probe_C"] == honest["probe_C"] == fit.c
    # The choice is the best validation score (ties to the smaller C).
    assert fit.val_top1[fit.c] == max(fit.val_top1.values())


def test_reads_never_ask_for_more_than_chunk_rows(problem, monkeypatch):
    asked, got = [], []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, **kw):
        asked.append((batch_size, tuple(kw.get("columns") or ())))
        for b in real(self, batch_size=batch_size, **kw):
            got.append((b.num_rows, tuple(b.schema.names)))
            yield b

    def whole(*a, **k):
        raise AssertionError("the streaming probe read a whole table or row group")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    s = StreamingSettings(c_grid=(0.1,), epochs=1, batch_size=32, chunk_rows=37)
    fit = fit_streaming_probe(problem["train"], s)
    score_streaming_probe(fit, problem["test"], chunk_rows=37)
    feature_reads = [n for n, cols in got if "feature" in cols]
    assert asked and all(size == 37 for size, cols in asked if "feature" in cols)
    assert max(feature_reads) == 37  # chunk-sized reads, the last of a pass shorter
    assert sum(feature_reads) >= 3 * len(problem["y"])  # moments, 1 epoch, check (+ test)


def test_schedule_and_settings_errors():
    assert lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="epochs"):
        StreamingSettings(epochs=0)
    with pytest.raises(ValueError, match="probe_kind"):
        ProtocolSettings(probe_kind="lbfgs")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        fit_streaming_probe(tmp_path / "nope.parquet", FAST)


def test_protocol_and_job_flag_select_the_streaming_probe(problem):
    from evaluation.protocol import _layer_metrics
    from evaluation.run import protocol_settings
    from jobs.probe import config_from, parse_args

    argv = ["--train-shards", "a.tar", "--test-shards", "b.tar", "--probe", "streaming"]
    assert protocol_settings(config_from(parse_args(argv))).probe_kind == "streaming"
    assert protocol_settings(config_from(parse_args(argv[:4]))).probe_kind == "sklearn"
    train, test = cache.load(problem["train"]), cache.load(problem["test"])
    s = ProtocolSettings(probe_kind="streaming", streaming=FAST, knn_k=5)
    metrics, pred = _layer_metrics(train, test, (problem["train"], problem["test"]), s)
    assert metrics["probe_epochs"] == FAST.epochs and "knn_top1" in metrics
    assert (pred == test.labels).mean() == pytest.approx(metrics["probe_top1"])


def test_the_cache_writes_small_row_groups(tmp_path):
    """The streaming probe's memory bound and shuffle depend on the cache's row groups."""
    n = cache.ROW_GROUP_ROWS * 2 + 5
    f = cache.Features(
        keys=np.array([f"k{i:06d}" for i in range(n)]),
        labels=np.zeros(n, dtype=np.int64),
        x=np.zeros((n, 2), dtype=np.float32),
    )
    meta = pq.ParquetFile(cache.save(f, tmp_path / "f.parquet")).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sizes == [cache.ROW_GROUP_ROWS, cache.ROW_GROUP_ROWS, 5]
