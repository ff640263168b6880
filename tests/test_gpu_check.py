"""benchmarks/gpu_check.py runs where CI runs (`--device cpu --quick`), so that the GPU check
is ready, not rotten, the day a GPU is lent: every row of its table present with a number."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

# (section, measurement prefix, unit) of every row the check prints.
ROWS = [
    ("train step", "reference (fp32 NCHW, BCELoss, Adam)", "img/s"),
    ("train step", "ours fp32 NCHW", "img/s"),
    ("train step", "ours bf16 channels_last", "img/s"),
    ("ray train", "1 worker, use_gpu=False (gloo)", "img/s"),
    ("ray train", "fit wall time", "s"),
    ("features", "extract ", "img/s"),
    ("streaming probe", "train 1 head", "rows/s"),
    ("streaming probe", "test top-1", "fraction"),
    ("input path", "webdataset, 0 decode workers", "img/s"),
    ("input path", "webdataset, 2 decode workers", "img/s"),
    ("input path", "best input / best step", "x"),
]


def table(stdout: str) -> list[tuple[str, str, str, str, str]]:
    """The markdown rows (section, measurement, value, unit, note), header and rule left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines() if line.startswith("| ")]  # fmt: skip
    return [tuple(r) for r in rows[1:] if not r[0].startswith("---")]


@pytest.mark.slow
@pytest.mark.integration
def test_quick_cpu_run_prints_every_row_with_a_number(cifar_dir):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--cifar-dir", str(cifar_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("machine: CPU ") and "torch" in lines[0]
    rows = table(out.stdout)
    assert len(rows) == len(ROWS), out.stdout
    for (section, what, unit), (got_section, got_what, value, got_unit, note) in zip(
        ROWS, rows, strict=True
    ):
        assert (got_section, got_unit) == (section, unit) and got_what.startswith(what), rows
        if value == "-":  # only bf16 where this CPU would emulate it
            assert "bf16" in what and "emulated" in note
            continue
        assert float(value.replace(",", "")) > 0, (what, value)
    top1 = next(float(r[2]) for r in rows if r[1] == "test top-1")
    assert 0.1 < top1 <= 1  # above chance (10 classes): the probe learned on the synthetic set


def test_cuda_without_a_gpu_is_a_one_line_usage_error():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert "--device cuda: no CUDA device here" in out.stderr.strip().splitlines()[-1]
    assert out.stdout == ""
