"""What a search chooses and on what: ranked by each trial's final score (the completed trials
first), never on the training images (data.val_shards is required), and the kNN score lives in
evaluation/, handed to the search (pipeline/ never imports evaluation/)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.config import Config, ConfigError, DataConfig
from pipeline.search import final_ranking, load_settings

REPO = Path(__file__).resolve().parents[1]


def trial(trial_id: str, step: int, knn: float, lr: float) -> SimpleNamespace:
    """A finished Tune trial's record as ResultGrid gives it: its config, its last report."""
    metrics = {"trial_id": trial_id, "step": step, "training_iteration": step // 3,
               "knn_top1": knn, "val_rec_l2": 0.1}  # fmt: skip
    return SimpleNamespace(config={"train.lr_g": lr}, metrics=metrics, error=None)


def test_final_ranking_puts_completed_trials_first_by_final_score():
    # "b" stopped early by ASHA with a high score at step 3: it has no final encoder and a
    # score from fewer steps, so the completed "c" (best final score) is chosen.
    results = [trial("a", 9, 0.40, 1e-3), trial("b", 3, 0.90, 2e-3), trial("c", 9, 0.55, 3e-3)]
    table = final_ranking(results, "knn_top1", "max", max_steps=9)
    assert list(table["trial_id"]) == ["c", "a", "b"]
    assert list(table["completed"]) == [True, True, False]
    assert table.loc[0, "config/train.lr_g"] == 3e-3
    low_first = final_ranking(results, "val_rec_l2", "min", max_steps=9)
    assert list(low_first["trial_id"][:2]) == ["a", "c"]  # ties keep their order
    with pytest.raises(RuntimeError, match="no trial"):
        final_ranking([SimpleNamespace(config={}, metrics={}, error="x")], "knn_top1", "max", 9)


def write_tune(tmp_path: Path, val_shards: str) -> Path:
    data = {"train_shards": "train-*.tar", "image_size": 32}
    if val_shards:
        data["val_shards"] = val_shards
    pretrain = {"data": data, "model": {"image_size": 32}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    tune = {"pretrain_config": "pretrain.yaml", "space": {"train.lr_g": {"choice": [1e-3]}}}
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump(tune))
    return tmp_path / "tune.yaml"


def test_search_without_val_shards_is_a_usage_error(tmp_path, capsys):
    from jobs.tune import cli

    with pytest.raises(ConfigError, match="no data.val_shards"):
        load_settings(write_tune(tmp_path, ""))
    settings, base = load_settings(write_tune(tmp_path, "val-*.tar"))
    assert base["data"]["val_shards"] == "val-*.tar"
    with pytest.raises(SystemExit) as e:
        cli(["--config", str(write_tune(tmp_path, ""))])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.val_shards" in line and "find themselves" in line


def test_knn_score_refuses_the_training_images_as_queries():
    from evaluation.knn_score import KnnScore
    from pipeline.search.settings import KnnScoreSettings

    cfg = Config(data=DataConfig(train_shards="train-*.tar", image_size=32))
    with pytest.raises(ValueError, match="data.val_shards"):
        KnnScore(cfg, KnnScoreSettings())


def test_library_never_imports_evaluation_or_jobs():
    """The layering runs pipeline -> evaluation -> jobs: no import in pipeline/ (at any depth,
    inside functions too) names evaluation or jobs."""
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in ("evaluation", "jobs")]  # fmt: skip
    assert offenders == []
