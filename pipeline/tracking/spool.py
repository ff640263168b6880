"""The on-disk part of rank 0's tracking queue: what could not be sent to MLflow yet.

Layout under one spool folder (`<output_root>/tracking_spool/`), per MLflow run:

- `<run_id>.jsonl`: one entry a line, in increasing `seq` order (the order it was logged);
- `<run_id>.ack.json`: `{"acked": seq, "ambiguous_upto": seq}`: every entry up to `acked` has
  been acknowledged by the server (so is skipped on replay); entries up to `ambiguous_upto` may
  have reached the server without an answer, and are checked against the run before resending;
- `<run_id>.files/`: the payloads of artifact and image entries (staged at log time, since a
  caller's temporary file is gone once the call returns).

Only one thread (the queue's sender) touches these files, so nothing here locks. A line cut
short by a hard kill is skipped with a counted warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Entry = dict[str, Any]  # {"seq": int, "kind": str, ...}; see pipeline.tracking.queue


class Spool:
    """The unsent entries of one run, oldest first, with an acknowledgement watermark."""

    def __init__(self, root: str | Path, run_id: str) -> None:
        self.root = Path(root)
        self.path = self.root / f"{run_id}.jsonl"
        self.ack_path = self.root / f"{run_id}.ack.json"
        self.files = self.root / f"{run_id}.files"
        # stage() runs on the training thread, tidy() on the sender's: without the lock the
        # sender could remove the payload folder between stage's two mkdirs (seen under load).
        self._files_lock = threading.Lock()
        self.skipped_lines = 0
        state = json.loads(self.ack_path.read_text()) if self.ack_path.is_file() else {}
        self.acked: int = state.get("acked", -1)
        self.ambiguous_upto: int = state.get("ambiguous_upto", -1)
        self._offset = 0  # byte offset of the first line not yet acknowledged
        self._ends: dict[int, int] = {}  # seq -> byte offset after its line, for what head() read
        self.last_seq = max(self.acked, self._scan_last_seq())

    def _scan_last_seq(self) -> int:
        last = -1
        for entry, _ in self._lines(0):
            last = entry["seq"]
        return last

    def _lines(self, offset: int):
        """(entry, offset after its line) from byte `offset` on; corrupt lines skipped."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(offset)
            for raw in f:
                offset += len(raw)
                try:
                    entry = json.loads(raw)
                    int(entry["seq"])
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
                    log.warning("tracking spool %s: skipped a corrupt line", self.path)
                    continue
                yield entry, offset

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

    def append(self, entries: list[Entry]) -> None:
        if not entries:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:
            if f.tell() > 0:  # a line cut short by a hard kill must not swallow the next one
                f.seek(f.tell() - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write("".join(json.dumps(e) + "\n" for e in entries).encode())
            f.flush()
            os.fsync(f.fileno())  # the spool is the durable copy: a hard kill must not lose it
        self.last_seq = max(self.last_seq, entries[-1]["seq"])

    def head(self, limit: int) -> list[Entry]:
        """Up to `limit` unacknowledged entries, oldest first."""
        out: list[Entry] = []
        for entry, end in self._lines(self._offset):
            if entry["seq"] <= self.acked:
                self._offset = end  # acknowledged before a restart: never resent
                continue
            out.append(entry)
            self._ends[entry["seq"]] = end
            if len(out) >= limit:
                break
        return out

    def pending(self) -> int:
        return sum(1 for e, _ in self._lines(self._offset) if e["seq"] > self.acked)

    def empty(self) -> bool:
        """Nothing unacknowledged on disk (cheap: no scan)."""
        return not self.path.is_file() or self._offset >= self.path.stat().st_size

    def write_state(self, inflight_upto: int = -1) -> None:
        """Persist the watermarks. `inflight_upto`: entries about to be sent; a process killed
        while they are on the wire leaves them ambiguous for the next one (but this process
        keeps treating them as unambiguous: they have not failed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.ack_path.with_suffix(".tmp")
        ambiguous = max(self.ambiguous_upto, inflight_upto)
        tmp.write_text(json.dumps({"acked": self.acked, "ambiguous_upto": ambiguous}))
        os.replace(tmp, self.ack_path)

    def ack(self, seq: int) -> None:
        """The server applied every entry up to `seq`; once nothing is left, remove the files."""
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
        self.tidy()

    def tidy(self) -> None:
        """Remove the payload folder once nothing refers to it."""
        with self._files_lock:
            if not self.path.is_file() and self.files.is_dir() and not any(self.files.iterdir()):
                shutil.rmtree(self.files, ignore_errors=True)

    def exists(self) -> bool:
        return self.path.is_file()
