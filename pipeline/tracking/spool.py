"""The on-disk part of rank 0's tracking queue: what could not be sent to MLflow yet.

Layout under one spool folder (`<output_root>/tracking_spool/`), per MLflow run:

- `<run_id>.jsonl`: one entry a line, in increasing `seq` order (the order it was logged);
- `<run_id>.ack.json`: `{"acked": seq, "ambiguous_upto": seq}`: every entry up to `acked` has
  been acknowledged by the server (so is skipped on replay); entries up to `ambiguous_upto` may
  have reached the server without an answer, and are checked against the run before resending;
- `<run_id>.files/`: the payloads of artifact and image entries (staged at log time, since a
  caller's temporary file is gone once the call returns);
- `<run_id>.dead.jsonl`: entries the server rejected for good (HTTP 4xx), with the error, for a
  person to read: never resent, never counted as sent;
- `<run_id>.lock`: held (flock) by the one process that sends this run's spool (`lock=True`): a
  live rank 0 or a replay. A second one waits for it or refuses (`SpoolBusyError`), so no entry
  is sent twice and nobody's `clear()` pulls the file from under another's read offset.

Within a process only the queue's sender thread writes these files. A line cut short by a hard
kill (a torn line) is skipped once, counted in `skipped_lines`, and read past.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

Entry = dict[str, Any]  # {"seq": int, "kind": str, ...}; see pipeline.tracking.queue


def open_for_write(path: Path, mode: str) -> BinaryIO:
    """Every write to the spool goes through here (one place where a full disk shows up, and
    where a test without a small filesystem to fill injects one). Unbuffered: a write error
    surfaces at `write`, not again when the file is closed."""
    return path.open(mode, buffering=0)


def _write_all(f: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) :]


class SpoolBusyError(RuntimeError):
    """Another process holds this run's spool (a live rank 0, or a replay)."""


class Spool:
    """The unsent entries of one run, oldest first, with an acknowledgement watermark.

    `lock=True` (a sender: the queue) takes the run's spool lock first, waiting at most
    `wait_s` for another holder, and reads the watermarks only then. Without it the spool is
    only looked at (tests, tools)."""

    def __init__(
        self, root: str | Path, run_id: str, *, lock: bool = False, wait_s: float = 0.0
    ) -> None:
        self.root = Path(root)
        self.path = self.root / f"{run_id}.jsonl"
        self.ack_path = self.root / f"{run_id}.ack.json"
        self.files = self.root / f"{run_id}.files"
        self.dead_path = self.root / f"{run_id}.dead.jsonl"
        self.lock_path = self.root / f"{run_id}.lock"
        self._lock_fd: int | None = None
        if lock:
            self._acquire(wait_s)
        # stage() runs on the training thread, tidy() on the sender's: without the lock the
        # sender could remove the payload folder between stage's two mkdirs (seen under load).
        self._files_lock = threading.Lock()
        self._torn: set[int] = set()  # byte offsets of lines skipped as corrupt (counted once)
        self._offset = 0  # byte offset of the first line not yet acknowledged
        self._ends: dict[int, int] = {}  # seq -> byte offset after its line, for what head() read
        state = self._read_state()
        self.acked: int = state.get("acked", -1)
        self.last_seq = max(self.acked, self._scan_last_seq())
        self.ambiguous_upto: int = state.get("ambiguous_upto", self.last_seq)

    def _read_state(self) -> dict[str, int]:
        """The watermarks; {} when none. An unreadable state file (torn by a crash while it was
        rewritten in place on a full disk) makes every entry ambiguous: each is checked against
        the run before it is sent, so nothing is sent twice."""
        if not self.ack_path.is_file():
            return {"acked": -1, "ambiguous_upto": -1}
        try:
            state = json.loads(self.ack_path.read_text())
            return {"acked": int(state["acked"]), "ambiguous_upto": int(state["ambiguous_upto"])}
        except (ValueError, KeyError, TypeError):
            log.warning("tracking spool %s: unreadable, every entry checked before resending",
                        self.ack_path)  # fmt: skip
            return {}

    @property
    def skipped_lines(self) -> int:
        return len(self._torn)

    # ---- the lock ---------------------------------------------------------------------------

    def _acquire(self, wait_s: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        deadline, said = time.monotonic() + wait_s, False
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise SpoolBusyError(
                        f"tracking spool {self.path} is in use by another process "
                        f"({self._holder()}); waited {wait_s:g} s"
                    ) from None
                if not said:
                    said = True
                    print(f"[tracking] waiting for {self._holder()}, which holds the tracking "
                          f"spool {self.path}", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(0.2)
                continue
            # The holder before us may have removed the lock file on release: a lock on an
            # unlinked file locks nothing, so start again with the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd = fd
        try:  # who holds it, for the other side's message (best effort: the disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode(), 0)
        except OSError:
            pass

    def _holder(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "unknown pid"
        except OSError:
            return "unknown pid"

    def release(self) -> None:
        """Give the lock up; its file goes too once this run has nothing spooled."""
        if self._lock_fd is None:
            return
        if not self.path.exists() and not self.ack_path.exists():
            self.lock_path.unlink(missing_ok=True)  # while held: waiters re-check the inode
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- reading ----------------------------------------------------------------------------

    def _scan_last_seq(self) -> int:
        last = -1
        for entry, _ in self._lines(0):
            if entry is not None:
                last = entry["seq"]
        return last

    def _lines(self, offset: int) -> Iterator[tuple[Entry | None, int]]:
        """(entry, offset after its line) from byte `offset` on; None for a corrupt line (a
        line torn by a hard kill mid-write), counted and warned about once."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                start, offset = offset, offset + len(raw)
                try:
                    entry = json.loads(raw)
                    int(entry["seq"])
                except (ValueError, KeyError, TypeError):
                    if start not in self._torn:
                        self._torn.add(start)
                        log.warning("tracking spool %s: skipped a corrupt line", self.path)
                    yield None, offset
                    continue
                yield entry, offset

    def head(self, limit: int) -> list[Entry]:
        """Up to `limit` unacknowledged entries, oldest first."""
        out: list[Entry] = []
        for entry, end in self._lines(self._offset):
            if entry is None or entry["seq"] <= self.acked:
                if not out:  # acknowledged before a restart, or torn: never read again
                    self._offset = end
                continue
            out.append(entry)
            self._ends[entry["seq"]] = end
            if len(out) >= limit:
                break
        return out

    def pending(self) -> int:
        return sum(
            1 for e, _ in self._lines(self._offset) if e is not None and e["seq"] > self.acked
        )

    def empty(self) -> bool:
        """Nothing unacknowledged on disk (cheap: no scan)."""
        return not self.path.is_file() or self._offset >= self.path.stat().st_size

    def exists(self) -> bool:
        return self.path.is_file()

    # ---- writing (the sender thread) --------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Append entries durably, all or nothing: on a write error (a full disk) the file is cut
        back to where it was, so no entry is both on disk and still held by the caller."""
        if not entries:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(e) + "\n" for e in entries).encode()
        with open_for_write(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            try:
                if size > 0:  # a line cut short by a hard kill must not swallow the next one
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
                _write_all(f, data)
                os.fsync(f.fileno())  # the spool is the durable copy: a hard kill must not lose it
            except OSError:
                os.ftruncate(f.fileno(), size)  # frees what was written: works on a full disk
                raise
        self.last_seq = max(self.last_seq, entries[-1]["seq"])

    def dead_letter(self, entries: list[Entry], error: str) -> None:
        """Keep entries the server rejected for good, with why, beside the spool."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps({**e, "error": error}) + "\n" for e in entries).encode()
        with open_for_write(self.dead_path, "ab") as f:
            _write_all(f, data)
            os.fsync(f.fileno())

    def write_state(self, inflight_upto: int = -1) -> None:
        """Persist the watermarks. `inflight_upto`: entries about to be sent; a process killed
        while they are on the wire leaves them ambiguous for the next one (but this process
        keeps treating them as unambiguous: they have not failed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.ack_path.with_suffix(".tmp")
        ambiguous = max(self.ambiguous_upto, inflight_upto)
        data = json.dumps({"acked": self.acked, "ambiguous_upto": ambiguous}).encode()
        try:
            with open_for_write(tmp, "wb") as f:
                _write_all(f, data)
            os.replace(tmp, self.ack_path)
        except OSError:
            tmp.unlink(missing_ok=True)
            if not self.ack_path.is_file():
                raise
            # A full disk has no block for a new file, but the old one's block can be rewritten
            # (not atomic: a crash in between leaves it unreadable, see _read_state).
            with open_for_write(self.ack_path, "r+b") as f:
                _write_all(f, data)
                f.truncate()

    def ack(self, seq: int) -> None:
        """The server applied (or rejected into the dead letters) every entry up to `seq`; once
        nothing is left, remove the files. The in-memory watermark moves even when persisting it
        fails (OSError raised): this process never resends, a later one checks (ambiguous)."""
        self.acked = max(self.acked, seq)
        if seq in self._ends:
            self._offset = max(self._offset, self._ends[seq])
            self._ends = {s: e for s, e in self._ends.items() if s > seq}
        if self.empty():
            self.clear()
        else:
            self.write_state()

    def clear(self) -> None:
        """Everything was sent: the spool of this run disappears (the watermark is kept in
        memory by the caller, so sequence numbers still only grow)."""
        self.path.unlink(missing_ok=True)
        self.ack_path.unlink(missing_ok=True)
        self._offset = 0
        self._ends.clear()
        self._torn.clear()
        self.tidy()

    # ---- payloads ---------------------------------------------------------------------------

    def stage(self, name: str) -> Path:
        """A fresh path `files/<unique>/<name>` for a payload an entry will refer to (its own
        folder: MLflow names an uploaded artifact after the file)."""
        folder = self.files / uuid.uuid4().hex
        with self._files_lock:
            folder.mkdir(parents=True)
        return folder / name

    def unstage(self, path: str) -> None:
        """Delete a payload once the server has it."""
        shutil.rmtree(Path(path).parent, ignore_errors=True)

    def tidy(self) -> None:
        """Remove the payload folder once nothing refers to it."""
        with self._files_lock:
            if not self.path.is_file() and self.files.is_dir() and not any(self.files.iterdir()):
                shutil.rmtree(self.files, ignore_errors=True)
