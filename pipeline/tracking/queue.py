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
  entries are marked ambiguous and `send` checks them against the run before resending.

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
    dropped: int = 0  # entries the server rejected for good (logged as errors)
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
    ) -> None:
        self._send, self._spool, self._is_permanent = send, spool, is_permanent
        self._max_memory, self._max_backoff_s = max_memory, max_backoff_s
        self._read_ahead = read_ahead
        self._memory: list[Entry] = []  # newer than everything in the spool file
        self._lock = threading.Lock()
        self._next_seq = spool.last_seq + 1
        self._wake, self._closing = threading.Event(), threading.Event()
        self._stop = threading.Event()
        self._abandoned = False
        self._inflight_upto = -1
        self._down_since: float | None = None
        self.stats = OutageStats()
        self.sent = 0
        self._thread = threading.Thread(target=self._loop, name="tracking-sender", daemon=True)
        self._thread.start()

    # ---- the caller's side: never blocks on the server ----------------------------------

    def put(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._memory.append({"seq": self._next_seq, "kind": kind, **fields})
            self._next_seq += 1
            if self._down_since is not None:
                self.stats.buffered += 1
        self._wake.set()

    def stage(self, name: str):
        """A path to put a payload at (an artifact's copy, an image's PNG) before `put`."""
        return self._spool.stage(name)

    def close(self, timeout_s: float, grace_s: float = 10.0) -> int:
        """Send what is left for at most `timeout_s`, then write the rest to the spool file.
        Returns how many entries remain unsent (0: all delivered, spool removed)."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()  # ends a backoff wait at once; an HTTP call in flight runs out
            self._thread.join(grace_s)
        with self._lock:
            self._abandoned = self._thread.is_alive()
            rest, self._memory = self._memory, []
        if self._abandoned and self._inflight_upto >= 0:
            # The stuck request may yet be applied: the next sender checks before resending.
            self._spool.ambiguous_upto = max(self._spool.ambiguous_upto, self._inflight_upto)
        self._spill(rest)
        if self._down_since is not None:
            self._end_outage()
        return self._spool.pending()

    def pending(self) -> int:
        with self._lock:
            return len(self._memory) + self._spool.pending()

    # ---- the sender thread ------------------------------------------------------------------

    def _loop(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            batch, from_file = self._next_batch()
            if not batch:
                if self._closing.is_set():
                    return
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            self._inflight_upto = batch[-1]["seq"]
            if from_file:
                self._spool.write_state(inflight_upto=batch[-1]["seq"])
            try:
                self._send(batch, self._spool.ambiguous_upto)
            except Exception as e:
                if self._is_permanent(e):
                    self._report_dropped(batch, e)
                else:
                    self._failed(batch, from_file, e)
                    self._stop.wait(delay)
                    delay = min(2 * delay, self._max_backoff_s)
                    continue
            delay = 0.5
            if not self._ack(batch, from_file):
                return
            if self._down_since is not None:
                self._recovered()

    def _next_batch(self) -> tuple[list[Entry], bool]:
        with self._lock:
            spill = self._down_since is not None or len(self._memory) > self._max_memory
            taken, self._memory = (self._memory, []) if spill else ([], self._memory)
        self._spill(taken)
        if not self._spool.empty():
            return take_batch(self._spool.head(self._read_ahead)), True
        with self._lock:
            return take_batch(self._memory[: self._read_ahead]), False

    def _spill(self, entries: list[Entry]) -> None:
        """Append entries (all newer than the file's) to the spool file, watermarks with them."""
        if entries:
            self._spool.append(entries)
            self._spool.write_state()

    def _ack(self, batch: list[Entry], from_file: bool) -> bool:
        with self._lock:
            if self._abandoned:
                return False  # close() has already spilled this batch as unsent
            last = batch[-1]["seq"]
            if from_file:
                self._spool.ack(last)
            else:
                self._memory = [e for e in self._memory if e["seq"] > last]
            self._inflight_upto = -1
        for e in batch:
            if "file" in e:
                self._spool.unstage(e["file"])
        self._spool.tidy()
        self.sent += len(batch)
        return True

    def _failed(self, batch: list[Entry], from_file: bool, error: Exception) -> None:
        self._spool.ambiguous_upto = max(self._spool.ambiguous_upto, batch[-1]["seq"])
        if from_file:
            self._spool.write_state()
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

    def _recovered(self) -> None:
        seconds = self._end_outage()
        _say(f"the tracking server is back after {seconds:.1f} s; sending what was kept")
        self.put("tags", tags={OUTAGE_TAG: self.stats.tag_value()})

    def _end_outage(self) -> float:
        seconds = time.monotonic() - (self._down_since or time.monotonic())
        self.stats.seconds += seconds
        self._down_since = None
        return seconds

    def _report_dropped(self, batch: list[Entry], error: Exception) -> None:
        self.stats.dropped += len(batch)
        _say(f"ERROR: the tracking server rejected {len(batch)} entries, dropped: {_short(error)}")


def _short(error: BaseException, n: int = 200) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= n else text[:n] + "..."


def _say(line: str) -> None:
    print(f"[tracking] {line}", file=sys.stderr, flush=True)
