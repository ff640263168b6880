"""The Tune search on a real local Ray, real CIFAR-10 shards, a real MLflow store in tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write_configs(tmp_path: Path, cifar_dir: Path, space: dict, **tune_extra) -> Path:
    pretrain = {
        "data": {
            "train_shards": str(cifar_dir / "cifar10-train-000000.tar"),
            "val_shards": str(cifar_dir / "cifar10-train-000001.tar"),
            "image_size": 32, "batch_size": 8, "shuffle_buffer": 64,
        },
        "model": {"image_size": 32, "width": 8, "bottleneck": 32},
        "train": {"max_steps": 6, "checkpoint_every": 3, "log_every": 3, "eval_batches": 1},
        "run": {"name": "tune-test", "output_root": str(tmp_path / "out"), "num_workers": 1,
                "max_failures": 0},
    }  # fmt: skip
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    tune = {
        "name": "search",
        "pretrain_config": "pretrain.yaml",
        "overrides": {"train.max_steps": 6},
        "space": space,
        "num_samples": 3,
        "objective": "knn_top1",
        "probe": {"train_samples": 64, "val_samples": 32},
        **tune_extra,
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tune))
    return path


SPACE = {
    "loss.lambda_adv": {"loguniform": [1.0e-4, 1.0e-1], "zero_prob": 0.3},
    "train.lr_g": {"loguniform": [1.0e-4, 3.0e-3]},
    "mask.kind": {"choice": ["center", "random_block"]},
}


@pytest.mark.slow
def test_three_trial_search(tmp_path, ray_local, cifar_dir):
    from mlflow.tracking import MlflowClient

    from jobs.tune import main

    res = main(["--config", str(write_configs(tmp_path, cifar_dir, SPACE))])

    table = res.table
    assert len(table) == 3
    assert table["knn_top1"].between(0, 1).all()
    assert table["val_rec_l2"].gt(0).all()  # both scores recorded, whichever ranks
    root = tmp_path / "out" / "tune" / "search"
    assert (root / "trials.parquet").is_file() and (root / "trials.csv").is_file()

    best = load_config(res.best_config_path)  # jobs.pretrain accepts it as is
    assert best.run.run_name == ""  # a fresh run, not a trial's
    best_row = table.iloc[0]  # the completed trial with the best final score
    assert best.train.lr_g == pytest.approx(best_row["config/train.lr_g"])
    assert best_row["trial_id"] == res.best_trial_id and best_row["completed"]
    assert best_row["step"] == 6

    c = MlflowClient(tracking_uri=res.tracking_uri)
    exp = c.get_experiment_by_name("tune-test")
    runs = c.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == res.parent_run_id]
    assert len(children) == 3
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)  # KILLED: ASHA
    assert all("knn_top1" in r.data.metrics for r in children)
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    names = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"trials.parquet", "trials.csv", "best_config.yaml"} <= names


@pytest.mark.parametrize(
    "space, match",
    [
        ({"loss.lambda_adv": {"uniform": [-0.5, 0.1]}}, "loss weights must be >= 0"),
        ({"mask.kind": {"choice": []}}, "non-empty list"),
        ({"train.lr_g": {"loguniform": [0.0, 1.0e-3]}}, "0 < low < high"),
        ({"loss.lambda_advv": {"uniform": [0.0, 0.1]}}, "not a config key"),
        ({"mask.kind": {"choice": ["centre"]}}, "is not one of"),
    ],
)
def test_impossible_space_is_a_clear_error(tmp_path, cifar_dir, space, match):
    from pipeline.search import build_space, load_settings

    settings, base = load_settings(write_configs(tmp_path, cifar_dir, space))
    with pytest.raises(ConfigError, match=match):
        build_space(settings, base)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_concurrency_is_not_sized_from_the_cluster_at_start(tmp_path, cifar_dir):
    """0 (the default) is no cap, whatever the cluster holds now; a positive value caps."""
    import dataclasses

    from pipeline.search import concurrent_trials, load_settings

    settings, _ = load_settings(write_configs(tmp_path, cifar_dir, SPACE))
    assert settings.max_concurrent_trials == 0 and concurrent_trials(settings) is None
    assert concurrent_trials(dataclasses.replace(settings, max_concurrent_trials=2)) == 2
    with pytest.raises(ConfigError, match="max_concurrent_trials must be >= 0"):
        load_settings(write_configs(tmp_path, cifar_dir, SPACE, max_concurrent_trials=-1))


def test_seeded_search_draws_the_same_trials_including_exact_zeros():
    """Every domain (zero_prob included) draws from Tune's random_state, which run_search seeds
    from the tune YAML's `seed`: the same seed repeats the search's trial configs."""
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from pipeline.search import build_space, load_settings

    settings, base = load_settings(REPO / "jobs" / "configs" / "tune_digits.yaml")
    space = build_space(settings, base)

    def draw(seed: int, n: int = 40) -> list[dict]:
        rng = _BackwardsCompatibleNumpyRng(seed)
        return [next(generate_variants(space, random_state=rng))[1] for _ in range(n)]

    first, again, other = draw(0), draw(0), draw(1)
    assert first == again and first != other
    adv = [t["loss.lambda_adv"] for t in first]
    assert 0 < sum(a == 0.0 for a in adv) < len(adv)  # zero_prob 0.25: some exact zeros
    assert all(a == 0.0 or 1e-4 <= a <= 1e-1 for a in adv)
