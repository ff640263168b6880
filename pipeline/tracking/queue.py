"""Rank 0's tracking never waits on the tracking server: a bounded queue and one sender thread.

Why not MLflow's own asynchronous logging (`log_batch(..., synchronous=False)`)? In MLflow 3.17
it is an unbounded in-memory `Queue` per process whose failed batches are only reported through
their futures, then forgotten; artifacts go through a second queue. A server outage longer than
the memory lasts, or a worker killed during one, would lose data. Here:

- a logging call appends an entry to memory under a lock held for microseconds and returns;
- one sender thread sends entries in order, a few at a time, and drops them only once the
  server has acknowledged them;
- when a send fails, the thread warns once (for the logger's lifetime), backs off (0.5 s doubling
  to `max_backoff_s`) and, while the server is down, writes what it holds to the spool file
  (`pipeline.tracking.spool`) at every retry, so a hard kill loses at most one retry interval;
  while the server is up, memory is bounded by `max_memory` entries, beyond which it spills too;
- the spool is sent first (oldest entries first), also by the next process that opens the same
  run's spool (a resumed rank 0, or `python -m jobs.replay_tracking`);
- a batch that failed may still have been applied (a timeout after the server wrote it): its
  entries are marked ambiguous and `send` checks them against the run before resending;
- a batch the server rejects for good (HTTP 4xx) is resent one entry at a time, and each entry
  rejected alone goes to the spool's dead-letter file: never counted as sent, never blocking;
- when the spool cannot be written (a full disk), memory holds at most `max_memory` entries and
  drops the oldest beyond, the spool is tried again every `spool_retry_s`; every entry lost that
  way (or to a torn spool line) is counted, warned about, and reported to the run as the metric
  `tracking/dropped_entries` and the tag `ce.tracking_lost` once entries flow again. Nothing the
  sender thread meets ends it.

`send(batch, ambiguous_upto)` does the MLflow calls (`pipeline.tracking.send`); this module
knows nothing of MLflow.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.tracking.spool import Entry, Spool

SendFn = Callable[[list[Entry], int], None]

# MLflow's REST limits per log_batch call (metrics, params, tags).
BATCH_LIMITS = {"rows": 1000, "params": 100, "tags": 100}
BATCHABLE = ("metrics", "params", "tags")
OUTAGE_TAG = "ce.tracking_outage"
LOST_METRIC = "tracking/dropped_entries"  # cumulative: entries lost (full disk, torn spool line)
LOST_TAG = "ce.tracking_lost"
REJECTED_METRIC = "tracking/rejected_entries"  # cumulative: entries in the dead-letter file
REJECTED_TAG = "ce.tracking_rejected"


def take_batch(entries: list[Entry]) -> list[Entry]:
    """The longest prefix of `entries` one request can carry: one artifact or image entry, or
    consecutive metrics/params/tags entries within MLflow's log_batch limits."""
    if not entries:
        return []
    if entries[0]["kind"] not in BATCHABLE:
        return entries[:1]
    used = dict.fromkeys(BATCH_LIMITS, 0)
    out: list[Entry] = []
    for e in entries:
        if e["kind"] not in BATCHABLE:
            break
        size = {k: len(e.get(k, ())) for k in BATCH_LIMITS}
        if out and any(used[k] + size[k] > BATCH_LIMITS[k] for k in BATCH_LIMITS):
            break
        out.append(e)
        used = {k: used[k] + size[k] for k in BATCH_LIMITS}
    return out


@dataclass
class OutageStats:
    outages: int = 0
    seconds: float = 0.0
    buffered: int = 0  # entries logged or pending while the server was unreachable
    rejected: int = 0  # entries the server rejected for good (in the dead-letter file)
    lost: int = 0  # entries dropped: spool not writable and memory full, or a torn spool line
    lost_reason: str = ""
    warned: bool = False

    def tag_value(self) -> str:
        return f"outages={self.outages} seconds={self.seconds:.1f} buffered={self.buffered}"


class TrackingQueue:
    """Entries in, in order, exactly once to the server (see the module docstring)."""

    def __init__(
        self,
        send: SendFn,
        spool: Spool,
        *,
        is_permanent: Callable[[BaseException], bool] = lambda e: False,
        max_memory: int = 1000,
        max_backoff_s: float = 10.0,
        read_ahead: int = 200,
        spool_retry_s: float = 2.0,
    ) -> None:
        self._send, self._spool, self._is_permanent = send, spool, is_permanent
        self._max_memory, self._max_backoff_s = max_memory, max_backoff_s
        self._read_ahead, self._spool_retry_s = read_ahead, spool_retry_s
        self._memory: list[Entry] = []  # newer than everything in the spool file
        self._lock = threading.Lock()
        self._next_seq = spool.last_seq + 1
        self._wake, self._closing = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._abandoned = False
        self._inflight_upto = -1
        self._single_upto = -1  # a rejected batch: its entries go one at a time up to here
        self._delay = 0.5
        self._down_since: float | None = None
        self._spool_down_since: float | None = None  # the spool cannot be written
        self._spool_retry_at = 0.0
        self._spool_full = False  # the last append failed: memory is bounded by dropping
        self._loss_warned = False
        self._reported = (0, 0)  # (lost, rejected) already put as metrics / tags
        self._last_step = 0
        self._errors = 0
        self.stats = OutageStats()
        self.sent = 0
        if spool.skipped_lines:
            self.lose(spool.skipped_lines, f"torn line(s) in {spool.path}, skipped")
        self._thread = threading.Thread(target=self._loop, name="tracking-sender", daemon=True)
        self._thread.start()

    # ---- the caller's side: never blocks on the server, nor on the disk ----------------------

    def put(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._memory.append({"seq": self._next_seq, "kind": kind, **fields})
            self._next_seq += 1
            if kind == "metrics":
                self._last_step = max([self._last_step, *(int(r[3]) for r in fields["rows"])])
            if self._down_since is not None:
                self.stats.buffered += 1
            dropped = self._bound_memory()
        self._dropped(dropped)
        self._wake.set()

    def stage(self, name: str):
        """A path to put a payload at (an artifact's copy, an image's PNG) before `put`."""
        return self._spool.stage(name)

    def unstage(self, path: str) -> None:
        self._spool.unstage(path)

    def lose(self, n: int, reason: str) -> None:
        """Count `n` entries as lost (warned once per episode, reported to the run later)."""
        with self._lock:
            self.stats.lost += n
            self.stats.lost_reason = reason
            warn, self._loss_warned = not self._loss_warned, True
        if warn:
            _say(
                f"WARNING: {n} tracking entries lost ({reason}); the losses are counted in the "
                f"run's {LOST_METRIC} metric and {LOST_TAG} tag and the end line (this warning "
                "is printed once until the spool is writable again)"
            )

    def close(self, timeout_s: float, grace_s: float = 10.0) -> int:
        """Send what is left for at most `timeout_s`, then write the rest to the spool file.
        Returns how many entries remain unsent (0: all delivered, spool removed). Never raises
        for the disk: what cannot be kept is counted in `stats.lost` and the lock released."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()  # ends a backoff wait at once; an HTTP call in flight runs out
            self._thread.join(grace_s)
        with self._lock:
            self._abandoned = self._thread.is_alive()
        if not self._abandoned:  # losses not yet told to the run go out with the rest
            self._report_losses(force=True)
        with self._lock:
            rest, self._memory = self._memory, []
        try:
            if self._abandoned and self._inflight_upto >= 0:
                # The stuck request may yet be applied: the next sender checks before resending.
                self._spool.ambiguous_upto = max(self._spool.ambiguous_upto, self._inflight_upto)
                self._save_state()
            self._spool_retry_at = 0.0
            if not self._spill(rest):
                self._dropped(rest, f"the spool {self._spool.path} is not writable at close")
            if self._down_since is not None:
                self._end_outage()
            try:
                return self._spool.pending()
            except OSError:  # unreadable now: at most what was never acknowledged
                return max(0, self._spool.last_seq - self._spool.acked)
        finally:
            self._spool.release()

    def pending(self) -> int:
        with self._lock:
            return len(self._memory) + self._spool.pending()

    # ---- the sender thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._step():
                    return
            except Exception as e:  # noqa: BLE001 - a bug or an odd I/O error: never die of it
                self._errors += 1
                if self._errors <= 3:
                    _say(f"ERROR: the tracking sender hit {_short(e)}; it goes on")
                self._stop.wait(1.0)

    def _step(self) -> bool:
        """One batch sent, rejected, or failed and backed off. False: the thread is done."""
        self._report_losses()
        batch, from_file = self._next_batch()
        if not batch:
            if self._closing.is_set():
                return False
            self._wake.wait(0.2)
            self._wake.clear()
            return True
        if batch[0]["seq"] <= self._single_upto:
            batch = batch[:1]
        self._inflight_upto = batch[-1]["seq"]
        if from_file:
            self._save_state(inflight_upto=batch[-1]["seq"])
        delivered = True
        try:
            self._send(batch, self._spool.ambiguous_upto)
        except Exception as e:
            if not self._is_permanent(e):
                self._failed(batch, from_file, e)
                self._stop.wait(self._delay)
                self._delay = min(2 * self._delay, self._max_backoff_s)
                return True
            if len(batch) > 1:  # which entry was it? Resend them one at a time, checked first
                self._single_upto = batch[-1]["seq"]
                self._spool.ambiguous_upto = max(self._spool.ambiguous_upto, batch[-1]["seq"])
                return True
            delivered = False
            self._reject(batch, e)
        self._delay = 0.5
        if not self._ack(batch, from_file, delivered):
            return False
        if self._down_since is not None:
            self._recovered()
        return True

    def _next_batch(self) -> tuple[list[Entry], bool]:
        with self._lock:
            spill = self._down_since is not None or len(self._memory) > self._max_memory
            spill = spill and time.monotonic() >= self._spool_retry_at
            taken, self._memory = (self._memory, []) if spill else ([], self._memory)
        if not self._spill(taken):
            with self._lock:
                self._memory[:0] = taken  # back in front: older than anything put since
                dropped = self._bound_memory()
            self._dropped(dropped)
        if not self._spool.empty():
            batch = take_batch(self._spool.head(self._read_ahead))
            if batch:
                return batch, True
            if self._spool.empty():  # only acknowledged or torn lines were left
                self._spool_io(self._spool.clear)
        with self._lock:
            return take_batch(self._memory[: self._read_ahead]), False

    def _spill(self, entries: list[Entry]) -> bool:
        """Append entries (all newer than the file's) to the spool file, watermarks with them.
        False when the disk refused them (they were not written at all)."""
        if not entries:
            return True
        if not self._spool_io(self._spool.append, entries):
            return False
        self._save_state()
        return True

    def _save_state(self, inflight_upto: int = -1) -> None:
        self._spool_io(self._spool.write_state, inflight_upto)

    def _spool_io(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run one spool write; an OSError (ENOSPC, EIO, a read-only remount) is said once per
        episode and never raised. Only a failed append (entries that could not be kept) puts
        memory under its bound and the spool on a `spool_retry_s` retry timer."""
        holds_entries = fn == self._spool.append
        try:
            fn(*args)
        except OSError as e:
            if holds_entries:
                self._spool_full = True
                self._spool_retry_at = time.monotonic() + self._spool_retry_s
            if self._spool_down_since is None:
                self._spool_down_since = time.monotonic()
                _say(
                    f"WARNING: cannot write the tracking spool {self._spool.path} ({_short(e)}); "
                    f"holding at most {self._max_memory} entries in memory, dropping the oldest "
                    f"beyond (counted), and trying the spool again every {self._spool_retry_s:g} s"
                )
            return False
        if holds_entries and self._spool_down_since is not None:
            self._spool_down_since, self._spool_full = None, False
            with self._lock:
                self._loss_warned = False
            _say(f"the tracking spool {self._spool.path} is writable again")
        return True

    def _bound_memory(self) -> list[Entry]:
        """(Under the lock.) While the spool cannot be written, the oldest entries beyond
        `max_memory` (but none in flight) are dropped; returns them."""
        if not self._spool_full or len(self._memory) <= self._max_memory:
            return []
        excess = len(self._memory) - self._max_memory
        keep = [e for e in self._memory if e["seq"] <= self._inflight_upto]
        droppable = [e for e in self._memory if e["seq"] > self._inflight_upto]
        dropped = droppable[:excess]
        self._memory = keep + droppable[excess:]
        return dropped

    def _dropped(self, entries: list[Entry], reason: str = "") -> None:
        if not entries:
            return
        for e in entries:
            if "file" in e:
                self._spool.unstage(e["file"])
        logged = [e for e in entries if not e.get("report")]
        if len(logged) < len(entries):
            self._reported = (0, 0)  # a loss report itself was dropped: put it again later
        if logged:
            reason = reason or f"the spool {self._spool.path} is not writable and memory is full"
            self.lose(len(logged), reason)

    def _report_losses(self, force: bool = False) -> None:
        """Once entries can flow (or at close, into the spool), tell the run what was lost or
        rejected: cumulative counts, so the last value is the total."""
        if self._down_since is not None and not force:
            return
        with self._lock:
            lost, rejected = self.stats.lost, self.stats.rejected
        if (lost, rejected) == self._reported:
            return
        self._reported = (lost, rejected)
        now, rows, tags = int(time.time() * 1000), [], {}
        if lost:
            rows.append([LOST_METRIC, float(lost), now, self._last_step])
            tags[LOST_TAG] = f"entries={lost} last_reason={self.stats.lost_reason}"[:5000]
        if rejected:
            rows.append([REJECTED_METRIC, float(rejected), now, self._last_step])
            tags[REJECTED_TAG] = f"entries={rejected} dead_letters={self._spool.dead_path}"
        self.put("metrics", rows=rows, report=True)  # report: not counted if itself dropped
        self.put("tags", tags=tags, report=True)

    def _ack(self, batch: list[Entry], from_file: bool, delivered: bool) -> bool:
        with self._lock:
            if self._abandoned:
                return False  # close() has already spilled this batch as unsent
            last = batch[-1]["seq"]
            if not from_file:
                self._memory = [e for e in self._memory if e["seq"] > last]
            self._inflight_upto = -1
        if from_file:  # the watermark moves in memory even if the disk refuses to persist it
            self._spool_io(self._spool.ack, last)
        if delivered:
            for e in batch:
                if "file" in e:
                    self._spool.unstage(e["file"])
            self.sent += len(batch)
        self._spool.tidy()
        return True

    def _failed(self, batch: list[Entry], from_file: bool, error: Exception) -> None:
        with self._lock:
            if self._abandoned:
                return  # the spool belongs to whoever opens it next
        self._spool.ambiguous_upto = max(self._spool.ambiguous_upto, batch[-1]["seq"])
        if from_file:
            self._save_state()
        if self._down_since is None:
            with self._lock:
                self._down_since = time.monotonic()
                self.stats.outages += 1
                self.stats.buffered += len(self._memory) + self._spool.pending()
            if not self.stats.warned:
                self.stats.warned = True
                _say(
                    f"WARNING: the tracking server is unreachable ({_short(error)}); training "
                    f"goes on, and what it logs is kept in {self._spool.path} and sent, in "
                    "order, when the server is back (this warning is printed once)"
                )

    def _reject(self, batch: list[Entry], error: Exception) -> None:
        """An entry the server will never take: into the dead letters, not counted as sent."""
        if not self._spool_io(self._spool.dead_letter, batch, _short(error, 2000)):
            self._dropped(
                batch, f"rejected by the server ({_short(error)}), dead letters unwritable"
            )
            return
        with self._lock:
            self.stats.rejected += len(batch)
        _say(
            f"ERROR: the tracking server rejected {len(batch)} entries ({_short(error)}); kept "
            f"in {self._spool.dead_path}, not sent"
        )

    def _recovered(self) -> None:
        seconds = self._end_outage()
        _say(f"the tracking server is back after {seconds:.1f} s; sending what was kept")
        self.put("tags", tags={OUTAGE_TAG: self.stats.tag_value()})

    def _end_outage(self) -> float:
        seconds = time.monotonic() - (self._down_since or time.monotonic())
        self.stats.seconds += seconds
        self._down_since = None
        return seconds


def _short(error: BaseException, n: int = 200) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= n else text[:n] + "..."


def _say(line: str) -> None:
    print(f"[tracking] {line}", file=sys.stderr, flush=True)
