"""The console scripts (jobs/_cli.py and each job's `cli`): usage errors exit 2 with one line
naming the problem and no traceback, genuine failures keep theirs, `--print-config` prints YAML
that loads back to the same config, shipped configs are found by name.

In-process calls of the `cli` functions for the fast tier; two real processes (`python -m`)
in the integration tier check what a shell sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import _cli, end_to_end, make_shards, pretrain, probe, tune
from pipeline.config import ConfigError, load_config
from pipeline.search import load_settings

REPO = Path(__file__).resolve().parents[1]


def exit_of(cli, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a console entry function."""
    with pytest.raises(SystemExit) as done:
        cli(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def assert_one_line(err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])


# ---- pretrain -------------------------------------------------------------------------------


def test_bad_key_exits_2_naming_the_key(tmp_path, capsys):
    code, out, err = exit_of(pretrain.cli, ["train.max_stpes=3", f"run.output_root={tmp_path}"],
                             capsys)  # fmt: skip
    assert code == 2 and out == ""
    assert_one_line(err, "max_stpes")
    code, _, err = exit_of(pretrain.cli, ["train.max_steps=many"], capsys)
    assert code == 2
    assert_one_line(err, "train.max_steps", "expected int")
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_shards_exit_2_naming_the_path(tmp_path, capsys):
    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    argv = [f"data.train_shards={pattern}", f"run.output_root={tmp_path / 'out'}"]
    code, out, err = exit_of(pretrain.cli, argv, capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "nothing-{000000..000003}.tar")


def test_defaults_without_shards_exit_2_naming_the_key(tmp_path, capsys):
    code, _, err = exit_of(pretrain.cli, [f"run.output_root={tmp_path}"], capsys)
    assert code == 2
    assert_one_line(err, "data.train_shards")


def test_print_config_round_trips(tmp_path, capsys):
    overrides = ["train.max_steps=7", "mask.fill_rgb=[1, 2, 3]", "run.register_model=ce"]
    code, out, err = exit_of(pretrain.cli, ["--config", "digits", "--print-config", *overrides],
                             capsys)  # fmt: skip
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    assert printed["train"]["max_steps"] == 7 and printed["run"]["register_model"] == "ce"
    (tmp_path / "printed.yaml").write_text(out)
    want = load_config(REPO / "jobs" / "configs" / "digits.yaml", overrides)
    assert load_config(tmp_path / "printed.yaml") == want
    assert pretrain.main(["--config", "digits", "--print-config"]) is None  # nothing ran


def test_named_configs_are_the_shipped_files():
    shipped = _cli.shipped_configs()
    on_disk = {p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml")}
    assert set(shipped) == on_disk and {"cifar10", "digits", "tune_digits"} <= on_disk
    assert (
        _cli.resolve_config("cifar10").read_text()
        == (REPO / "jobs" / "configs" / "cifar10.yaml").read_text()
    )
    assert _cli.resolve_config(None) is None
    with pytest.raises(ConfigError, match=r"'cifar11'.*shipped: .*cifar10, digits"):
        _cli.resolve_config("cifar11")


def test_unknown_config_name_exits_2_listing_the_shipped_ones(capsys):
    code, _, err = exit_of(pretrain.cli, ["--config", "cifar11"], capsys)
    assert code == 2
    assert_one_line(err, "cifar11", "digits", "paper128")


# ---- tune, probe, make_shards, end_to_end ---------------------------------------------------


def test_tune_print_config_round_trips(tmp_path, capsys):
    code, out, _ = exit_of(tune.cli, ["--config", "tune_digits", "--print-config", "num_samples=3"],
                           capsys)  # fmt: skip
    assert code == 0
    (tmp_path / "tune.yaml").write_text(out)
    want = load_settings(REPO / "jobs" / "configs" / "tune_digits.yaml", ["num_samples=3"])
    got = load_settings(tmp_path / "tune.yaml")
    assert got[1] == want[1] and got[0].num_samples == 3 and got[0].space == want[0].space


def test_tune_bad_key_exits_2(capsys):
    code, _, err = exit_of(tune.cli, ["--config", "tune_digits", "num_sampels=3"], capsys)
    assert code == 2
    assert_one_line(err, "num_sampels")


def test_probe_input_errors_exit_2(tmp_path, capsys):
    shards = str(tmp_path / "gone-{0..1}.tar")
    code, _, err = exit_of(probe.cli, ["--train-shards", shards, "--test-shards", shards], capsys)
    assert code == 2
    assert_one_line(err, "--train-shards", "gone-{0..1}.tar")
    (tmp_path / "s.tar").write_bytes(b"")
    flags = ["--train-shards", str(tmp_path / "s.tar"), "--test-shards", str(tmp_path / "s.tar")]
    code, _, err = exit_of(probe.cli, [*flags, "--encoder", f"ce={tmp_path / 'no.pt'}"], capsys)
    assert code == 2
    assert_one_line(err, "ce=", "no.pt")
    code, _, err = exit_of(probe.cli, [*flags, "--encoder", "a=x.pt", "--encoder", "a=y.pt"],
                           capsys)  # fmt: skip
    assert code == 2
    assert_one_line(err, "unique")
    code, out, _ = exit_of(probe.cli, [*flags, "--encoder", "m=models:/ce@champion",
                                       "--print-config"], capsys)  # fmt: skip
    assert code == 0 and yaml.safe_load(out)["encoders"] == {"m": "models:/ce@champion"}


def test_make_shards_errors_exit_2(tmp_path, capsys):
    code, _, err = exit_of(make_shards.cli, ["--src", str(tmp_path / "missing"), "--out",
                                             str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2
    assert_one_line(err, str(tmp_path / "missing"))


def test_end_to_end_flag_errors_exit_2(capsys):
    code, _, err = exit_of(end_to_end.cli, ["--steps", "0", "--trials", "-1"], capsys)
    assert code == 2
    assert_one_line(err, "--steps", "--trials")


def test_end_to_end_refuses_an_object_storage_root(capsys):
    code, _, err = exit_of(end_to_end.cli, ["--output-root", "s3://bucket/e2e"], capsys)
    assert code == 2
    assert_one_line(err, "--output-root", "s3://bucket/e2e")


# ---- the wrapper's rule: only the check phase's errors are the user's -----------------------


def test_errors_while_working_keep_their_traceback(capsys):
    def prepare(argv):
        def work():
            raise FileNotFoundError("a bug: a file the code itself wrote is gone")

        return work

    with pytest.raises(FileNotFoundError, match="a bug"):
        _cli.run_cli("x", prepare, [])
    assert capsys.readouterr().err == ""

    def bad_config_later(argv):
        def work():
            raise ConfigError("train.max_steps: expected int")  # the user's wherever it arises

        return work

    with pytest.raises(SystemExit) as done:
        _cli.run_cli("x", bad_config_later, [])
    assert done.value.code == 2
    assert capsys.readouterr().err == "x: error: train.max_steps: expected int\n"


def test_console_scripts_point_at_cli_functions():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"ce-make-shards", "ce-pretrain", "ce-tune", "ce-probe",
                            "ce-benchmark", "ce-finetune", "ce-end-to-end"}  # fmt: skip
    for name, target in scripts.items():
        module, func = target.split(":")
        job = sys.modules.get(module) or __import__(module, fromlist=[func])
        assert callable(getattr(job, func)), name
        assert job.PROG[0] == name and job.PROG[1] == module  # the name its errors carry


# ---- real processes -------------------------------------------------------------------------


def run_module(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow
def test_a_shell_sees_exit_2_and_one_line(tmp_path):
    done = run_module("jobs.pretrain", "--config", "digits", "train.max_stpes=3", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() != "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m jobs.pretrain: error:")
    assert "max_stpes" in done.stderr
