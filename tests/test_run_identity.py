"""Run identity: a checkpoint's manifest stores its config and fingerprint; rerunning the run
name with another config is refused before anything starts (exit 2, one line naming the keys),
unless run.allow_config_change=true, and then the changes are MLflow tags; default run names
never collide.

Fast tier: the decision on real manifests in a real run folder, and the console entry refusing
before Ray or MLflow start. Integration: two real Ray Train runs of the same name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from jobs import pretrain
from pipeline.checkpoint import MANIFEST_FILE, save_checkpoint, stored_config, write_manifest
from pipeline.config import RUN_NAME, Config, ConfigError, load_config, to_dict
from pipeline.data.writer import Source, digits_source, write_shards
from pipeline.identity import (
    SAFE_TO_CHANGE,
    change_tags,
    check_resume,
    fingerprint,
    resume_changes,
)
from pipeline.pretrain import run_name_for
from pipeline.ray_train import storage_path
from pipeline.runtime import resolve_paths


def tiny(root: Path, shards: Path, **extra: object) -> list[str]:
    base = {
        "data.train_shards": str(shards / "dg-*.tar"),
        "data.image_size": 32, "model.image_size": 32, "model.width": 8, "model.bottleneck": 16,
        "data.batch_size": 8, "data.shuffle_buffer": 16, "train.max_steps": 2,
        "train.log_every": 1, "train.checkpoint_every": 2, "train.sample_every": 2,
        "train.eval_batches": 0, "run.output_root": str(root), "run.name": "identity",
        "run.num_workers": 1, "run.max_failures": 0, "run.system_metrics_every_s": 0,
        "run.run_name": "same-name", "train.precision": "fp32",
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    src = digits_source(32)
    write_shards(Source(src.items[:48], src.classes, []), out, prefix="dg", shard_size=24,
                 seed=0, progress=False)  # fmt: skip
    return out


def stored_run(root: Path, cfg: Config, run_name: str, step: int, name: str) -> Path:
    """A checkpoint folder as a run's rank 0 leaves it in storage (pipeline.ray_train._report):
    the training file, then the manifest holding the resolved config."""
    folder = Path(storage_path(str(root))) / run_name / name
    folder.mkdir(parents=True)
    save_checkpoint(folder / "checkpoint.pt", {"step": step, "config": to_dict(cfg)})
    write_manifest(folder, step=step, config=to_dict(cfg))
    return folder


# ---- the decision ---------------------------------------------------------------------------


def test_fingerprint_changes_with_defining_keys_only():
    base = to_dict(Config())
    same = to_dict(
        dataclasses.replace(
            Config(),
            train=dataclasses.replace(Config().train, max_steps=5, log_every=3),
            run=dataclasses.replace(Config().run, num_to_keep=9, tracking_uri="http://h:5000"),
        )
    )
    loss = dataclasses.replace(Config().loss, lambda_rec=0.5)
    other = to_dict(dataclasses.replace(Config(), loss=loss))
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(base))
    assert fingerprint(same) == fingerprint(base)
    assert fingerprint(other) != fingerprint(base)
    # Keys that fix each batch are not in the safe list.
    for key in ("run.num_workers", "data.num_workers", "data.batch_size", "train.seed",
                "data.train_shards", "train.precision", "run.name", "run.run_name"):  # fmt: skip
        assert key not in SAFE_TO_CHANGE


def test_check_resume_refuses_allows_and_never_allows_architecture():
    old = to_dict(Config())
    new = to_dict(load_config(None, ["train.lr_d=0.001", "data.batch_size=32",
                                     "train.max_steps=2000"]))  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_resume(old, new, run_name="r", step=200)
    msg = str(e.value)
    assert "run.run_name='r' has a checkpoint at step 200" in msg
    assert "data.batch_size (64 -> 32), train.lr_d (0.0002 -> 0.001)" in msg
    assert "max_steps" not in msg and "run.allow_config_change=true" in msg
    # Only safe keys: allowed without the override, still reported for the tags.
    safe = to_dict(load_config(None, ["train.max_steps=2000", "train.log_every=5"]))
    assert check_resume(old, safe, run_name="r", step=1) == {
        "train.log_every": (10, 5), "train.max_steps": (1000, 2000)
    }  # fmt: skip
    allowed = to_dict(load_config(None, ["train.lr_d=0.001", "run.allow_config_change=true"]))
    changes = check_resume(old, allowed, run_name="r", step=1)
    assert change_tags(changes) == {
        "config_change.run.allow_config_change": "False -> True",
        "config_change.train.lr_d": "0.0002 -> 0.001",
    }
    # A key the stored config lacks (an older version wrote it) counts only off its default.
    older = to_dict(Config())
    del older["run"]["allow_config_change"], older["train"]["log_every"]
    assert check_resume(older, to_dict(Config()), run_name="r", step=1) == {}
    assert check_resume(older, safe, run_name="r", step=1)["train.log_every"] == (None, 5)
    arch = to_dict(load_config(None, ["model.width=32", "run.allow_config_change=true"]))
    with pytest.raises(ConfigError, match=r"model.width \(64 -> 32\) cannot change on resume"):
        check_resume(old, arch, run_name="r", step=1)
    no_d = to_dict(load_config(None, ["loss.lambda_adv=0", "run.allow_config_change=true"]))
    with pytest.raises(ConfigError, match="a discriminator on/off"):
        check_resume(old, no_d, run_name="r", step=1)


def test_stored_config_is_the_newest_manifest_with_a_config(tmp_path):
    a = load_config(None, ["train.lr_d=0.001"])
    b = load_config(None, ["train.lr_d=0.002"])
    stored_run(tmp_path, a, "run", 200, "checkpoint_2026-01-01_00-00-01")
    newest = stored_run(tmp_path, b, "run", 400, "checkpoint_2026-01-01_00-00-02")
    legacy = newest.parent / "checkpoint_2026-01-01_00-00-03"  # no config: written before
    legacy.mkdir()
    save_checkpoint(legacy / "checkpoint.pt", {"step": 600})
    write_manifest(legacy, step=600)
    cut = newest.parent / "checkpoint_2026-01-01_00-00-04"  # upload cut off: no manifest
    cut.mkdir()
    import pyarrow.fs as pafs

    run_path = str(Path(storage_path(str(tmp_path))) / "run")
    got = stored_config(pafs.LocalFileSystem(), run_path)
    assert got is not None and got.step == 400 and got.config["train"]["lr_d"] == 0.002
    manifest = (newest / MANIFEST_FILE).read_text()
    assert fingerprint(to_dict(b)) in manifest
    assert stored_config(pafs.LocalFileSystem(), str(tmp_path / "nothing")) is None
    # resume_changes: the same decision from the storage path a job computes.
    c = load_config(None, ["train.lr_d=0.002", "train.max_steps=9"])
    assert resume_changes(c, "run", storage_path(str(tmp_path))) == {"train.max_steps": (1000, 9)}
    assert resume_changes(c, "fresh", storage_path(str(tmp_path))) == {}


def test_default_run_names_are_unique_and_valid():
    cfg = load_config(None, ['run.name=my exp\'s "name"'])
    names = {run_name_for(cfg) for _ in range(200)}  # all in the same second or two
    assert len(names) == 200
    for n in names:
        assert RUN_NAME.fullmatch(n), n
        assert re.fullmatch(r"my-exp-s--name--\d{8}-\d{6}-[0-9a-f]{6}", n), n
    assert run_name_for(load_config(None, ["run.run_name=given"])) == "given"


# ---- the console entry refuses before Ray or MLflow start ------------------------------------


def test_rerun_with_another_config_exits_2_before_anything_starts(tmp_path, shards, capsys):
    root = tmp_path / "out"
    first = resolve_paths(load_config(None, tiny(root, shards)))  # as the workers stored it
    stored_run(root, first, "same-name", 2, "checkpoint_2026-01-01_00-00-01")
    with pytest.raises(SystemExit) as done:
        pretrain.cli(tiny(root, shards, **{"data.batch_size": 4, "mask.overlap": 2}))
    out, err = capsys.readouterr()
    assert done.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "data.batch_size (8 -> 4), mask.overlap (4 -> 2)" in lines[0]
    assert "run.allow_config_change=true" in lines[0]
    from mlflow import MlflowClient

    exp = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_experiment_by_name("identity")
    assert exp is None  # no MLflow run opened, none left RUNNING
    assert "[pretrain] run" not in out


# ---- real Ray Train runs --------------------------------------------------------------------


@pytest.mark.slow  # two Ray Train runs: ~2-3 min on a loaded 2-core machine
def test_allowed_change_resumes_tags_and_refingerprints(tmp_path, shards, ray_local, one_thread):
    from mlflow import MlflowClient

    root = tmp_path / "out"
    first = pretrain.main(tiny(root, shards))
    assert first.metrics["step"] == 2
    with pytest.raises(ConfigError, match=r"train.lr_d \(0.0002 -> 0.0003\)"):
        pretrain.main(tiny(root, shards, **{"train.lr_d": 3e-4, "train.max_steps": 4}))
    second = pretrain.main(
        tiny(
            root,
            shards,
            **{"train.lr_d": 3e-4, "train.max_steps": 4, "run.allow_config_change": "true"},
        )  # fmt: skip
    )
    assert second.mlflow_run_id == first.mlflow_run_id and second.metrics["step"] == 4
    run = MlflowClient(first.tracking_uri).get_run(first.mlflow_run_id)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("config_change.")}
    assert tags == {
        "config_change.train.lr_d": "0.0002 -> 0.0003",
        "config_change.train.max_steps": "2 -> 4",
        "config_change.run.allow_config_change": "False -> True",
    }
    assert run.data.params["train.lr_d"] == "0.0002"  # params are immutable: the tags say it
    metrics = MlflowClient(first.tracking_uri).get_metric_history(
        run.info.run_id, "resumed_from_step"
    )
    assert [m.value for m in metrics] == [2.0]
    import pyarrow.fs as pafs

    latest = stored_config(pafs.LocalFileSystem(), str(Path(storage_path(str(root))) / "same-name"))
    assert latest is not None and latest.step == 4 and latest.config["train"]["lr_d"] == 3e-4
