"""Feature cache files (round trip, damage detection) and the result table and plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evaluation import cache, report
from evaluation.cache import CacheKey, Features


def feats(n=20, d=6, seed=0) -> Features:
    rng = np.random.default_rng(seed)
    return Features(
        keys=np.array([f"k{i:03d}" for i in range(n)], dtype=object),
        labels=rng.integers(0, 10, n),
        x=rng.normal(size=(n, d)).astype(np.float32),
    )


def test_cache_round_trip_is_exact(tmp_path):
    f = feats()
    path = CacheKey("ab" * 32, "train-0123", "eval32-pool4096", "conv2").path(tmp_path)
    cache.save(f, path)
    got = cache.load(path)
    assert got is not None
    assert list(got.keys) == list(f.keys)
    np.testing.assert_array_equal(got.labels, f.labels)
    np.testing.assert_array_equal(got.x, f.x)
    assert got.x.dtype == np.float32
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_truncated_cache_file_is_damaged(tmp_path, caplog):
    path = cache.save(feats(), tmp_path / "a.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert cache.load(path) is None
    assert "damaged" in caplog.text


def test_silently_changed_content_is_damaged(tmp_path):
    # A readable Parquet file whose values changed after writing: only the checksum sees it.
    import pyarrow.parquet as pq

    path = cache.save(feats(), tmp_path / "a.parquet")
    table = pq.read_table(path)
    other = cache.save(feats(seed=1), tmp_path / "b.parquet")
    forged = pq.read_table(other).replace_schema_metadata(table.schema.metadata)
    pq.write_table(forged, path)
    assert cache.load(path) is None
    assert cache.load(tmp_path / "missing.parquet") is None


def test_cache_key_separates_every_part(tmp_path):
    base = CacheKey("w" * 64, "train-1", "eval32-pool4096", "conv1")
    others = [
        CacheKey("v" * 64, "train-1", "eval32-pool4096", "conv1"),
        CacheKey("w" * 64, "test-1", "eval32-pool4096", "conv1"),
        CacheKey("w" * 64, "train-1", "eval64-pool4096", "conv1"),
        CacheKey("w" * 64, "train-1", "eval32-pool4096", "conv2"),
    ]
    assert len({k.path(tmp_path) for k in [base, *others]}) == 5


def sample_table() -> pd.DataFrame:
    rows = []
    for enc, acc in (("ce", 0.6), ("random_init", 0.4)):
        for layer, bonus in (("conv1", 0.0), ("conv2", 0.1)):
            rows += report.rows_for(enc, layer, {"probe_top1": acc + bonus, "probe_C": 0.1})
    rows += report.rows_for("raw_pixels", "pixels", {"probe_top1": 0.39, "probe_C": 0.01})
    rows += report.rows_for("ce", "output", {"inpaint_l1": 0.1})
    return report.make_table(rows)


def test_table_shape_files_and_best_layer(tmp_path):
    df = sample_table()
    assert list(df.columns) == ["encoder", "layer", "metric", "value"]
    assert len(df) == 2 * 2 * 2 + 2 + 1
    assert report.best_layer(df) == ("ce", "conv2")
    pq_path, csv_path = report.write_table(df, tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(pq_path), df)
    assert pd.read_csv(csv_path)["value"].sum() == pytest.approx(df["value"].sum())
    text = report.format_table(df)
    assert "raw_pixels" in text and "0.7" in text and "inpaint_l1" in text
    w = report.wide(df)
    assert w.loc[("ce", "conv2"), "probe_top1"] == pytest.approx(0.7)
    assert np.isnan(w.loc[("ce", "output"), "probe_top1"])


def test_unconverged_probes_are_marked_in_the_table():
    df = sample_table()
    assert "(!)" not in report.format_table(df)  # no probe_converged rows: nothing to mark
    rows = report.rows_for("ce", "conv1", {"probe_top1": 0.6, "probe_converged": 1.0})
    rows += report.rows_for("ce", "conv2", {"probe_top1": 0.7, "probe_converged": 0.0})
    df = report.make_table(rows)
    assert report.unconverged_probes(df) == [("ce", "conv2")]
    lines = report.format_table(df).splitlines()
    assert any("conv2 (!)" in line for line in lines)
    assert not any("conv1 (!)" in line for line in lines)
    assert "did not converge" in lines[-1] and "ce/conv2" in lines[-1]


def test_probes_with_c_at_the_edge_are_marked_in_the_table():
    rows = report.rows_for("ce", "conv1", {"probe_top1": 0.6, "probe_C_at_edge": 1.0})
    rows += report.rows_for("ce", "conv2", {"probe_top1": 0.7, "probe_C_at_edge": 0.0})
    df = report.make_table(rows)
    assert report.edge_probes(df) == [("ce", "conv1")]
    lines = report.format_table(df).splitlines()
    assert any("conv1 (edge)" in line for line in lines)
    assert not any("conv2 (edge)" in line for line in lines)
    assert "still at the edge" in lines[-1] and "ce/conv1" in lines[-1]


def test_duplicate_rows_are_refused():
    rows = report.rows_for("a", "l", {"m": 1.0}) * 2
    with pytest.raises(ValueError, match="duplicate"):
        report.make_table(rows)


def test_plots_are_real_pngs(tmp_path):
    df = sample_table()
    bar = report.accuracy_bar_chart(df, tmp_path / "bar.png")
    y = np.array([0, 1, 2, 2, 1])
    cm = report.confusion_matrix_plot(y, y[::-1], ["a", "b", "c"], tmp_path / "cm.png", "t")
    for p in (bar, cm):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200
