"""pipeline.progress: the [train] lines rank 0 prints (durations, numbers, the line itself) and
the ETA from a smoothed step rate, driven by a fake clock."""

from __future__ import annotations

import io
import math

import pytest

from pipeline.progress import (
    ProgressLog,
    checkpoint_line,
    emit,
    format_duration,
    format_number,
    progress_line,
    smoothed,
    tracked,
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (44.6, "45s"), (700, "11m40s"), (3599.4, "59m59s"), (7380, "2h03m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_unknown_duration_is_a_question_mark(bad: float) -> None:
    assert format_duration(bad) == "?"


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.0123, "0.0123"), (0.012, "0.0120"), (1.3142, "1.31"), (412.4, "412"), (0.0, "0")],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


def test_progress_line_matches_the_issue_example() -> None:
    losses = {"loss_d": 1.3061, "loss_rec": 0.012, "loss_g": 0.01234, "d_x": 0.7}
    line = progress_line(1200, 6000, 3, losses, 412.2, 700)
    assert line == (
        "[train] step 1200/6000 (20%) epoch 3 | loss_g 0.0123 loss_rec 0.0120 loss_d 1.31 | "
        "412 img/s | ETA 11m40s"
    )
    # Reconstruction only: no D losses to show, and no section left empty.
    line = progress_line(5, 10, 0, {"loss_rec": 0.5}, 10, float("nan"))
    assert line == "[train] step 5/10 (50%) epoch 0 | loss_rec 0.500 | 10 img/s | ETA ?"


def test_progress_line_shows_the_data_wait_share() -> None:
    """fit's data_wait_frac (rank 0's wait for its batch / its step) reaches the line, so a
    starved accelerator shows in the log; a NaN one (nothing measured) is left out."""
    line = progress_line(1200, 6000, 3, {"loss_g": 0.01234}, 412.2, 700, data_wait_frac=0.351)
    assert line == (
        "[train] step 1200/6000 (20%) epoch 3 | loss_g 0.0123 | 412 img/s | data wait 35% | "
        "ETA 11m40s"
    )
    assert "data wait" not in progress_line(5, 10, 0, {}, 10, 1, data_wait_frac=float("nan"))
    log = ProgressLog(max_steps=10, start_step=0, world_size=1, batch_per_rank=4,
                      clock=lambda: 0.0)  # fmt: skip
    assert "| data wait 80% |" in log.line({"step": 2, "images_per_s": 8, "data_wait_frac": 0.8})


def test_eta_comes_from_the_smoothed_step_rate() -> None:
    now = [100.0]
    log = ProgressLog(max_steps=1000, start_step=200, world_size=2, batch_per_rank=32,
                      clock=lambda: now[0])  # fmt: skip
    assert log.start() == (
        "[train] start at step 200/1000 (resumed from a checkpoint) | 2 workers | "
        "global batch 64 (32 x 2)"
    )
    now[0] += 10.0  # 100 steps in 10 s: 10 steps/s, 700 left
    first = log.line({"step": 300, "epoch": 1, "loss_g": 0.5, "images_per_s": 160.0})
    assert first.endswith("| 320 img/s | ETA 1m10s")  # img/s is per rank x 2 ranks
    now[0] += 50.0  # 100 steps in 50 s: 2 steps/s, smoothed with 10 -> 0.3*2 + 0.7*10 = 7.6
    second = log.line({"step": 400, "epoch": 1, "images_per_s": 64.0})
    assert log.rate == pytest.approx(7.6)
    assert second.endswith(f"ETA {format_duration(600 / 7.6)}") and "ETA 1m19s" in second
    now[0] += 20.0
    assert log.end(1000) == "[train] done: step 1000/1000 in 1m20s | 640 img/s on average"


def test_repeated_step_or_frozen_clock_keeps_the_rate() -> None:
    now = [0.0]
    log = ProgressLog(100, 0, 1, 8, clock=lambda: now[0])
    assert "ETA ?" in log.line({"step": 0, "images_per_s": 1.0})  # no rate yet
    now[0] = 5.0
    log.line({"step": 10, "images_per_s": 1.0})
    log.line({"step": 10, "images_per_s": 1.0})  # same step, same instant: no division by 0
    assert log.rate == 2.0


def test_smoothed_and_checkpoint_line() -> None:
    assert smoothed(None, 4.0) == 4.0 and smoothed(4.0, 8.0, weight=0.25) == 5.0
    assert math.isclose(smoothed(1.0, 1.0), 1.0)
    assert checkpoint_line(400, {"val_rec_l2": 0.01482, "val_images": 56.0}) == (
        "[train] checkpoint at step 400 | val_rec_l2 0.0148 val_images 56.0"
    )
    assert checkpoint_line(7, {}) == "[train] checkpoint at step 7"


class FakeClock:
    """Advances by `step` seconds every time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_tracked_prints_periodic_lines_when_not_a_terminal() -> None:
    out = io.StringIO()  # not a tty: a job log or a file
    items = list(range(10))
    got = list(tracked(items, desc="extract enc test", unit="batch", interval_s=3.0,
                       stream=out, clock=FakeClock(1.0)))  # fmt: skip
    assert got == items  # every item passes through, in order
    lines = out.getvalue().splitlines()
    # The clock reads 1 at the start, then 2..11 after items 1..10: a line once 3 s have
    # passed since the last (after items 3, 6, 9), and the final one (read at 12: 11 s in).
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [3, 6, 9, 10]
    assert lines[0] == "[extract enc test] 3/10 batch (30%) | 1.00 batch/s | ETA 7s"
    assert (
        lines[-1]
        == f"[extract enc test] 10/10 batch (100%) | {format_number(10 / 11)} batch/s | ETA 0s"
    )  # noqa: E501
    assert "\r" not in out.getvalue()


def test_tracked_without_a_total_and_on_a_terminal() -> None:
    out = io.StringIO()
    assert list(tracked(iter("abc"), desc="x", stream=out, clock=FakeClock(1.0))) == ["a", "b", "c"]
    assert out.getvalue() == "[x] 3 it | 0.750 it/s\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    assert list(tracked(range(4), desc="probe C sweep", unit="fit", stream=tty)) == [0, 1, 2, 3]
    assert "probe C sweep" in tty.getvalue() and "4/4" in tty.getvalue()  # tqdm's bar
    assert "\r" in tty.getvalue()


def test_emit_writes_one_flushed_line(capsys) -> None:
    emit("[train] step 1/2 (50%)")
    assert capsys.readouterr().out == "[train] step 1/2 (50%)\n"
