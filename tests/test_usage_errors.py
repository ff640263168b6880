"""Every usage error is one line and exit 2, before anything runs: a malformed YAML names
file:line:column (through the real `python -m` entry of every job that reads YAML), and config
values that used to be accepted and then broke the run (`*_every=0`, `num_to_keep=0`,
`max_failures=-2`, quoted run names, relative sqlite URIs) are refused naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import pretrain
from pipeline.checkpoint import upload_checkpoint_dir, write_manifest
from pipeline.retry import NO_RETRY

REPO = Path(__file__).resolve().parents[1]
BAD_YAML = "data: [unclosed\n"


def run_module(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def assert_one_line_exit_2(done: subprocess.CompletedProcess, prog: str, *names: str) -> str:
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"python -m {prog}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---- malformed YAML, through the console entry ----------------------------------------------


@pytest.mark.integration  # a fresh interpreter per job (imports torch): seconds each
@pytest.mark.parametrize("module", ["jobs.pretrain", "jobs.tune"])
def test_malformed_yaml_is_one_line_naming_file_line_column(module, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    done = run_module(module, "--config", str(bad), cwd=tmp_path)
    # The parser stops at the end of the stream (line 2, column 1); the list opened at 1:7.
    line = assert_one_line_exit_2(done, module, f"{bad}:2:1:", "invalid YAML", "line 1, column 7")
    assert "<unicode string>" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


@pytest.mark.integration
def test_tune_names_its_malformed_pretrain_config(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 3\n   lr_d: 1\n")
    (tmp_path / "tune.yaml").write_text("pretrain_config: base.yaml\nnum_samples: 1\n")
    done = run_module("jobs.tune", "--config", str(tmp_path / "tune.yaml"), cwd=tmp_path)
    assert_one_line_exit_2(done, "jobs.tune", f"{tmp_path / 'base.yaml'}:3:", "invalid YAML")


# ---- the same path in-process (fast tier) ----------------------------------------------------


def cli_exit(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        pretrain.cli(argv)
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return done.value.code, lines[0]


def test_malformed_yaml_and_override_in_process(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text('train:\n  max_steps: 3\n  log_every: "10\n')
    code, line = cli_exit(["--config", str(bad)], capsys)
    assert code == 2 and f"{bad}:4:1: invalid YAML" in line and "quoted scalar" in line
    code, line = cli_exit(["--print-config", "data.train_shards=[a.tar"], capsys)
    assert code == 2 and "override 'data.train_shards=[a.tar': invalid YAML value" in line


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.log_every=0", ["train.log_every must be > 0"]),
        ("train.checkpoint_every=0", ["train.checkpoint_every must be > 0"]),
        ("train.checkpoint_every=-5", ["train.checkpoint_every must be > 0"]),
        ("train.sample_every=0", ["train.sample_every must be > 0"]),
        ("run.num_to_keep=0", ["run.num_to_keep must be >= 1"]),
        ("run.max_failures=-2", ["run.max_failures must be >= -1"]),
        ("run.run_name=x' or '1'='1", ["run.run_name", "x' or '1'='1"]),
        ('run.run_name=a"b', ["run.run_name"]),
        ("run.run_name=../escape", ["run.run_name"]),
        ("run.tracking_uri=sqlite:///mlflow.db", ["relative sqlite path", "sqlite:////"]),
    ],
)
def test_values_that_broke_the_run_are_refused_up_front(override, names, tmp_path, capsys):
    """Refused while the config loads: no MLflow run is opened (none is left RUNNING), no
    output root is created."""
    code, line = cli_exit(["--print-config", override, f"run.output_root={tmp_path}/out"], capsys)
    assert code == 2
    for name in names:
        assert name in line, (name, line)
    assert not (tmp_path / "out").exists()


def test_relative_sqlite_hint_is_the_absolute_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, line = cli_exit(["--print-config", "run.tracking_uri=sqlite:///sub/m.db"], capsys)
    assert f"sqlite:///{tmp_path.resolve()}/sub/m.db" in line


@pytest.mark.parametrize("ok", ["run.run_name=ce-2026.12.07_a1", "run.max_failures=-1",
                                "run.tracking_uri=sqlite:////abs/m.db"])  # fmt: skip
def test_legitimate_values_still_load(ok, capsys):
    with pytest.raises(SystemExit) as done:
        pretrain.cli(["--print-config", ok])
    assert done.value.code == 0, capsys.readouterr().err


# ---- the final checkpoint copy on local storage is fsynced ----------------------------------


def test_local_checkpoint_upload_fsyncs_files_then_folders(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    src = tmp_path / "src"
    src.mkdir()
    (src / "checkpoint.pt").write_bytes(b"x" * 1000)
    write_manifest(src, step=7)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:  # the real fsync, and which path it was for
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    dest = tmp_path / "run" / "checkpoint_0001"
    upload_checkpoint_dir(src, pafs.LocalFileSystem(), str(dest), NO_RETRY, step=7)
    assert synced == [
        str(dest / "checkpoint.pt"), str(dest), str(dest.parent),
        str(dest / "checkpoint_manifest.json"), str(dest), str(dest.parent),
    ]  # fmt: skip
    assert (dest / "checkpoint.pt").read_bytes() == b"x" * 1000
