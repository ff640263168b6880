"""Console progress for a pretraining run: the lines rank 0 prints so that `ray job logs
--follow` (or a terminal) shows step, losses, throughput and an ETA.

    [train] start at step 0/6000 (fresh) | 2 workers | global batch 64 (32 x 2)
    [train] step 1200/6000 (20%) epoch 3 | loss_g 0.0123 loss_rec 0.0120 loss_d 1.31 | 412 img/s | data wait 35% | ETA 11m40s
    [train] checkpoint at step 1200 | val_rec_l2 0.0148 val_fill_l2 0.0391
    [train] done: step 6000/6000 in 58m12s | 405 img/s on average

The formatting is pure functions; `ProgressLog` keeps the only state (a smoothed step rate, so
one slow step, a checkpoint, or the first steps' warm-up do not swing the ETA). Nothing here
knows Ray: pipeline.ray_train calls it from rank 0's on_log.

`tracked(iterable, desc=...)` is the same idea for loops outside training (feature extraction,
the probe's C sweep): a tqdm bar on a terminal, and where output goes to a file or a job log
(where a bar's carriage returns make one unreadable line) a plain line every `interval_s`.
"""  # noqa: E501

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LOSS_KEYS = ("loss_g", "loss_rec", "loss_d")  # shown in this order when present
SMOOTHING = 0.3  # weight of the newest interval in the step rate: adapts within ~5 logs


def emit(line: str) -> None:
    """Write one line to stdout now. Not print(): inside a Ray Train worker print is patched to
    log through the root logger and, when stdout is wrapped, also to print, so each line would
    reach the job log twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    """'45s', '11m40s', '2h03m', or '?' when unknown (not finite or negative)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_number(value: float) -> str:
    """Three significant digits, trailing zeros kept so columns line up: 0.0120, 1.31, 412."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}"


def progress_line(
    step: int,
    max_steps: int,
    epoch: int,
    losses: Mapping[str, float],
    images_per_s: float,
    eta_s: float,
    data_wait_frac: float | None = None,
) -> str:
    """One compact line: step, share done, epoch, the LOSS_KEYS present, img/s, the share of
    the step spent waiting for the batch (when measured: a high one means decoding starves
    the accelerator), ETA."""
    pct = 100 * step // max(max_steps, 1)
    parts = " ".join(f"{k} {format_number(losses[k])}" for k in LOSS_KEYS if k in losses)
    line = f"[train] step {step}/{max_steps} ({pct}%) epoch {epoch}"
    if parts:
        line += f" | {parts}"
    line += f" | {images_per_s:.0f} img/s"
    if data_wait_frac is not None and math.isfinite(data_wait_frac):
        line += f" | data wait {100 * data_wait_frac:.0f}%"
    return f"{line} | ETA {format_duration(eta_s)}"


def start_line(step: int, max_steps: int, world_size: int, batch_per_rank: int) -> str:
    how = "fresh" if step == 0 else "resumed from a checkpoint"
    return (
        f"[train] start at step {step}/{max_steps} ({how}) | {world_size} workers | "
        f"global batch {batch_per_rank * world_size} ({batch_per_rank} x {world_size})"
    )


def end_line(step: int, max_steps: int, seconds: float, images: int) -> str:
    rate = images / seconds if seconds > 0 else float("nan")
    return (
        f"[train] done: step {step}/{max_steps} in {format_duration(seconds)} | "
        f"{rate:.0f} img/s on average"
    )


def checkpoint_line(step: int, scores: Mapping[str, float]) -> str:
    """'[train] checkpoint at step 400 | val_rec_l2 0.0148 ...' (the held-out scores, if any)."""
    shown = " ".join(f"{k} {format_number(float(v))}" for k, v in scores.items())
    return f"[train] checkpoint at step {step}" + (f" | {shown}" if shown else "")


def smoothed(previous: float | None, new: float, weight: float = SMOOTHING) -> float:
    """Exponential moving average; the first value is taken as is."""
    return new if previous is None else weight * new + (1 - weight) * previous


class ProgressLog:
    """Rank 0's progress lines. `line(metrics)` takes fit's on_log dict (step, epoch, losses,
    images_per_s of this rank) and shows the global img/s (x world size: every rank steps the
    same batch) and an ETA from the smoothed step rate since the previous call."""

    def __init__(
        self,
        max_steps: int,
        start_step: int,
        world_size: int,
        batch_per_rank: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_steps, self.world, self.batch = max_steps, world_size, batch_per_rank
        self.clock = clock
        self.start_step = self.last_step = start_step
        self.t_start = self.t_last = clock()
        self.rate: float | None = None  # steps/s, smoothed

    def start(self) -> str:
        return start_line(self.start_step, self.max_steps, self.world, self.batch)

    def line(self, metrics: Mapping[str, float]) -> str:
        step, now = int(metrics["step"]), self.clock()
        if step > self.last_step and now > self.t_last:
            self.rate = smoothed(self.rate, (step - self.last_step) / (now - self.t_last))
        self.last_step, self.t_last = step, now
        eta = (self.max_steps - step) / self.rate if self.rate else float("nan")
        images_per_s = float(metrics.get("images_per_s", float("nan"))) * self.world
        wait = metrics.get("data_wait_frac")
        return progress_line(
            step, self.max_steps, int(metrics.get("epoch", 0)), metrics, images_per_s, eta,
            None if wait is None else float(wait),
        )  # fmt: skip

    def end(self, step: int) -> str:
        images = (step - self.start_step) * self.batch * self.world
        return end_line(step, self.max_steps, self.clock() - self.t_start, images)


def tracked_line(desc: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """'[extract cifar test] 12/40 batch (30%) | 2.50 batch/s | ETA 11s' (no share or ETA
    when the total is unknown)."""
    rate = done / seconds if seconds > 0 else float("nan")
    line = f"[{desc}] {done}"
    if total:
        eta = (total - done) / rate if rate > 0 else float("nan")
        line += f"/{total} {unit} ({100 * done // total}%) | {format_number(rate)} {unit}/s"
        return f"{line} | ETA {format_duration(eta)}"
    return f"{line} {unit} | {format_number(rate)} {unit}/s"


def tracked(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    interval_s: float = 30.0,
    stream: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """Yield from `iterable`, showing progress on `stream` (stderr): a tqdm bar when it is a
    terminal, else a `tracked_line` at most every `interval_s` seconds and one at the end."""
    stream = stream if stream is not None else sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if stream.isatty():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, mininterval=1.0)
        return
    t0 = last = clock()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = clock()
        if now - last >= interval_s:
            print(tracked_line(desc, done, total, unit, now - t0), file=stream, flush=True)
            last = now
    print(tracked_line(desc, done, total, unit, clock() - t0), file=stream, flush=True)
