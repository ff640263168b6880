"""`ce-benchmark` end to end on real tar shards: two context-encoder seeds against random init
(two seeds) and raw pixels, both protocols, two label fractions; the results CSV, the val-only
headline and gap, the MLflow parent and child runs, and a rerun that resumes every unit."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from test_eval_protocol import write_shards

from evaluation.bench_report import RESULT_COLUMNS
from jobs.benchmark import main
from pipeline.checkpoint import save_encoder
from pipeline.config import Config, DataConfig, ModelConfig
from pipeline.model import build_generator

# Width 32: conv1 is 32 x 16 x 16, pooled to 11 x 11 (3,872) under `gap` and 16 x 16 (8,192)
# under `spatial`; conv3 (128 x 4 x 4 = 2,048) is the same under both, so its units are shared.
WIDE = Config(data=DataConfig(image_size=32), model=ModelConfig(image_size=32, width=32,
                                                                 bottleneck=16))  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("bench")
    train = write_shards(root / "shards", "train", 4, 30, seed=0)
    test = write_shards(root / "shards", "test", 2, 25, seed=1)
    encoders = []
    for seed in (0, 1):
        torch.manual_seed(10 + seed)
        path = root / f"ce{seed}" / "generator.pt"
        save_encoder(path, build_generator(WIDE.model), WIDE)
        encoders += ["--encoder", f"ce={path},seed={seed}"]
    return root, train, test, encoders


def run(setup, *extra: str) -> str:
    root, train, test, encoders = setup
    return main([
        *encoders, "--train-shards", train, "--test-shards", test, "--output-root",
        str(root / "out"), "--layers", "conv1,conv3", "--fractions", "0.3,1",
        "--random-init-seeds", "2", "--results-dir", str(root / "results"), "--n-boot", "300",
        "--c-grid", "0.01,0.1", "--grid-rows", "0", "--max-iter", "200", "--blas-threads", "1",
        "--cv-below", "60", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_benchmark_end_to_end_and_resume(setup):
    root = setup[0]
    run_id = run(setup)
    csv = pd.read_csv(root / "results" / "cifar10.csv")
    assert list(csv.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    # 2 ce seeds + 2 random-init seeds, 2 layers; raw pixels 1 layer; x 2 protocols x 2 fractions
    assert len(csv) == (4 * 2 + 1) * 2 * 2
    assert set(csv.kind) == {"context_encoder", "random_init", "raw_pixels"}
    assert set(csv.protocol) == {"gap", "spatial"} and set(csv.label_fraction) == {0.3, 1.0}
    assert ((csv.test_ci_low <= csv.test_top1) & (csv.test_top1 <= csv.test_ci_high)).all()
    assert csv.val_top1.between(0, 100).all() and csv.test_top1.between(0, 100).all()
    # 30 % (36 images) is cross-validated, 100 % (120) uses the 10 % carve (12 images).
    assert set(csv[csv.label_fraction == 0.3].val_method) == {"cv5"}
    assert set(csv[csv.label_fraction == 1].n_val) == {12}
    # conv1 differs between protocols; conv3 is pooled alike, so both protocols share its unit.
    table = pd.read_parquet(root / "out" / "benchmark" / "cifar10" / "table.parquet")
    dims = table.groupby(["protocol", "layer"]).feature_dim.first()
    assert (dims["gap", "conv1"], dims["spatial", "conv1"]) == (3872, 8192)
    assert dims["gap", "conv3"] == dims["spatial", "conv3"] == 2048
    units = root / "out" / "benchmark" / "cifar10" / "units"
    assert len(list(units.glob("*.json"))) == (4 * 3 + 1) * 2
    # Every unit is done, so the features are spent and gone (--keep-features keeps them).
    assert not list((root / "out" / "feature_cache").rglob("*.parquet"))
    # One headline (encoder, layer) per kind, protocol and fraction, chosen on validation.
    head = csv[csv.headline]
    for (kind, _, _), rows in head.groupby(["kind", "protocol", "label_fraction"]):
        assert rows[["encoder", "layer"]].drop_duplicates().shape[0] == 1
        assert len(rows) == {"context_encoder": 2, "random_init": 2, "raw_pixels": 1}[kind]
    summary = (root / "results" / "cifar10_summary.md").read_text()
    assert "| gap | 100%" in summary and "95 % CI" in summary and "26 units" in summary
    assert (root / "results" / "cifar10_label_efficiency.png").stat().st_size > 1000

    uri = f"sqlite:///{root / 'out' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert any(k.startswith("gap/gap/f1") for k in parent.data.metrics)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 5  # ce s0, ce s1, random_init s0, s1, raw_pixels
    ce0 = next(c for c in children if c.info.run_name == "ce-s0")
    assert "val_top1/gap/f1/conv1" in ce0.data.metrics
    assert any(k.startswith("val_top1_C/") for k in ce0.data.metrics)

    # The rerun resumes: no unit recomputed (their files untouched), the same MLflow runs.
    stamps = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    assert run(setup) == run_id
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == stamps
    again = pd.read_csv(root / "results" / "cifar10.csv")
    pd.testing.assert_frame_equal(again, csv)
    assert len(client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'")) == 5


@pytest.mark.slow
def test_finetune_rows_are_ingested(setup, tmp_path):
    root = setup[0]
    test_n = 50
    right = np.zeros(test_n, bool)
    right[:30] = True
    np.save(tmp_path / "ce.npy", right)
    rows = [
        {"encoder": "ce_ft", "kind": "context_encoder", "seed": 0, "label_fraction": 1.0,
         "val_top1": 70.0, "test_top1": 60.0, "test_n": test_n, "test_correct": "ce.npy"},
        {"encoder": "ri_ft", "kind": "random_init", "seed": 0, "label_fraction": 1.0,
         "val_top1": 50.0, "test_top1": 40.0, "test_n": test_n},
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "ft.csv", index=False)
    run(setup, "--finetune-results", str(tmp_path / "ft.csv"))
    csv = pd.read_csv(root / "results" / "cifar10.csv")
    ft = csv[csv.protocol == "finetune"].set_index("encoder")
    assert ft.loc["ce_ft", "headline"] and ft.loc["ri_ft", "headline"]
    assert ft.loc["ce_ft", "test_ci_low"] < 60 < ft.loc["ce_ft", "test_ci_high"]
    gap = pd.read_csv(root / "out" / "benchmark" / "cifar10" / "gap.csv")
    g = gap[gap.protocol == "finetune"].iloc[0]
    assert g.gap == pytest.approx(20.0) and g.gap_ci_low < 20 < g.gap_ci_high


def test_bad_encoder_flag_is_one_line(capsys):
    from jobs.benchmark import cli

    with pytest.raises(SystemExit) as exc:
        cli(["--encoder", "ce=x.pt,colour=red", "--train-shards", "a", "--test-shards", "b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown option 'colour=red'" in err[0]


def test_print_config_shows_the_probe_defaults(capsys):
    assert main(["--train-shards", "a", "--test-shards", "b", "--print-config"]) is None
    out = capsys.readouterr().out
    assert "extend_steps: 4" in out and "cv_below: 2000" in out and "- spatial" in out
    json.dumps(out)


@pytest.mark.slow
def test_parts_compute_disjoint_units_then_the_whole_run_resumes_them(setup, tmp_path):
    root, train, test, encoders = setup
    flags = [*encoders, "--train-shards", train, "--test-shards", test, "--output-root",
             str(tmp_path), "--layers", "conv3", "--fractions", "1", "--protocols", "gap",
             "--random-init-seeds", "1", "--n-boot", "100", "--c-grid", "0.1",
             "--blas-threads", "1"]  # fmt: skip
    units = tmp_path / "benchmark" / "cifar10" / "units"
    assert main([*flags, "--part", "0/2"]) is None  # ce s0, random_init s0
    assert sorted(p.stem.split("__")[0] + p.stem.split("__")[1] for p in units.glob("*.json")) == [
        "ces0", "random_inits0"]  # fmt: skip
    assert not (tmp_path / "mlflow.db").exists()  # parts log nothing
    main([*flags, "--part", "1/2"])  # ce s1, raw pixels
    assert len(list(units.glob("*.json"))) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    main(flags)
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == stamps
    assert "0 units computed" in (tmp_path / "benchmark" / "cifar10" / "summary.md").read_text()


def test_a_protocols_own_fractions_are_checked_and_shown(capsys):
    flags = ["--train-shards", "a", "--test-shards", "b", "--print-config"]
    main([*flags, "--protocol-fractions", "spatial=0.01,0.1"])
    assert "protocol_fractions:\n  spatial:\n  - 0.01\n  - 0.1\n" in capsys.readouterr().out
    for bad, says in [("spatial", "expected PROTOCOL=F1,F2"), ("spatial=x", "expected PROTOCOL"),
                      ("spatial=2", "of spatial must be in (0, 1]"),
                      ("knn=0.1", "fractions given for ['knn']")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            main([*flags, "--protocol-fractions", bad])


@pytest.mark.slow
def test_a_protocol_runs_only_its_own_fractions(setup, tmp_path):
    root, train, test, encoders = setup
    main([*encoders[:2], "--train-shards", train, "--test-shards", test, "--output-root",
          str(tmp_path), "--layers", "conv1", "--fractions", "0.3,1", "--protocol-fractions",
          "spatial=0.3", "--random-init-seeds", "1", "--no-raw-pixels", "--n-boot", "100",
          "--c-grid", "0.1", "--cv-below", "60", "--blas-threads", "1"])  # fmt: skip
    table = pd.read_parquet(tmp_path / "benchmark" / "cifar10" / "table.parquet")
    got = table.groupby("protocol").label_fraction.apply(lambda f: sorted(set(f))).to_dict()
    assert got == {"gap": [0.3, 1.0], "spatial": [0.3]}
    # conv1 pools differently under the two protocols: 2 encoders x (2 gap + 1 spatial) units.
    assert len(list((tmp_path / "benchmark" / "cifar10" / "units").glob("*.json"))) == 6
    gap = pd.read_csv(tmp_path / "benchmark" / "cifar10" / "gap.csv")
    assert sorted(zip(gap.protocol, gap.label_fraction, strict=True)) == [
        ("gap", 0.3), ("gap", 1.0), ("spatial", 0.3)]  # fmt: skip
