"""Faults around rank 0's tracking, on real parts: a real `mlflow server` SIGKILLed and restarted,
a real full filesystem (a small tmpfs; ENOSPC injected at the spool's file layer only where this
machine cannot mount one), a spool torn by a crash, a second process (`python -m
jobs.replay_tracking`) beside a live sender, a replay aimed at a server that lacks the run, and
entries the store rejects. Each test checks that every (key, step) is in MLflow exactly once, or
that what was lost is counted, and reported to the run and in the end line."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tracking import (
    LOST_METRIC,
    LOST_TAG,
    REJECTED_METRIC,
    RunLogger,
    client,
    new_run,
    tracked_run,
)
from pipeline.tracking import spool as spool_module
from pipeline.tracking.queue import TrackingQueue
from pipeline.tracking.send import MlflowSender, is_permanent
from pipeline.tracking.spool import Spool
from servers import MlflowServer, dead_uri, wait_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def steps(uri: str, run_id: str, key: str) -> list[int]:
    """Every logged step of `key`, sorted, duplicates kept (so a repeat shows)."""
    return sorted(m.step for m in client(uri).get_metric_history(run_id, key))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


class Transport:
    """The real MLflow sender behind a switch: `down` refuses every batch (nothing applied)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.send, self.down = MlflowSender(client(uri), run_id), False

    def __call__(self, batch, ambiguous_upto) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.send(batch, ambiguous_upto)


class FullDisk:
    """A folder on a 1 MiB tmpfs that `fill()` fills up and `free()` frees. Where mounting is
    not allowed (no root, no CAP_SYS_ADMIN), every spool write raises ENOSPC between the two
    instead (the spool's `open_for_write` hook), and `kind` says so."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path, self._filler = path, path / "filler"
        path.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]
        try:
            ok = subprocess.run(mount, capture_output=True).returncode == 0
        except FileNotFoundError:
            ok = False
        self.kind, self.full = ("tmpfs" if ok else "injected ENOSPC"), False
        if not ok:
            real = spool_module.open_for_write

            def open_for_write(p: Path, mode: str):
                if self.full and "r" not in mode:
                    raise OSError(errno.ENOSPC, "No space left on device (injected)", str(p))
                return real(p, mode)

            monkeypatch.setattr(spool_module, "open_for_write", open_for_write)
        print(f"[test] full disk: {self.kind}", file=sys.stderr)

    def fill(self) -> None:
        self.full = True
        if self.kind == "tmpfs":
            with self._filler.open("wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError as e:
                    assert e.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture()
def full_disk(tmp_path, monkeypatch):
    disk = FullDisk(tmp_path / "disk", monkeypatch)
    yield disk
    disk.unmount()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("server"))
    s.start()
    yield s
    s.kill()


@pytest.mark.integration
def test_server_killed_and_restarted_on_a_full_disk_loses_only_counted_entries(
    server, full_disk, capfd
):
    run_id = new_run(server.uri, "faults", "full-disk")
    logger = RunLogger(server.uri, run_id, spool_dir=full_disk.path / "spool", max_memory=20,
                       max_backoff_s=0.5, spool_retry_s=0.5)  # fmt: skip
    queue = logger._queue
    full_disk.fill()

    # Server up, disk full: nothing needs the disk, nothing is lost.
    for step in range(20):
        logger.metrics({"loss": float(step)}, step=step)
    assert wait_for(lambda: queue.pending() == 0, 30)

    # Server killed, disk full: memory holds 20 entries (+ the batch in flight), drops the oldest.
    server.kill()
    for step in range(20, 80):
        logger.metrics({"loss": float(step)}, step=step)
        time.sleep(0.01)
    assert wait_for(lambda: queue.stats.lost >= 30, 10), queue.stats
    assert len(queue._memory) <= 20 + 10  # the bound (+ at most one batch in flight)
    lost = queue.stats.lost

    # Disk freed, server still down: at its next try the sender spools what memory holds, and
    # from then on nothing more is lost.
    full_disk.free()
    assert wait_for(lambda: not queue._spool_full, 10)
    assert queue.stats.lost == lost
    for step in range(80, 100):
        logger.metrics({"loss": float(step)}, step=step)
    assert wait_for(lambda: logger.spool.exists() and logger.spool.pending() >= 20, 10)
    assert queue.stats.lost == lost

    server.start()
    line = logger.close(timeout_s=60)
    assert line.startswith("[tracking] ") and " entries sent to " in line, line
    assert f"; {lost} entries LOST (" in line and "NOT sent" not in line
    got = steps(server.uri, run_id, "loss")
    assert len(got) == len(set(got))  # nothing twice
    missing = sorted(set(range(100)) - set(got))
    assert len(missing) == lost and set(got) >= set(range(20)) | set(range(80, 100))
    run = client(server.uri).get_run(run_id)
    assert run.data.metrics[LOST_METRIC] == lost  # reported to the run...
    assert run.data.tags[LOST_TAG].startswith(f"entries={lost} ")
    err = capfd.readouterr().err
    assert "cannot write the tracking spool" in err and "is writable again" in err  # ...and said
    assert not logger.spool.path.exists() and not logger.spool.lock_path.exists()


def test_a_torn_spool_line_is_counted_and_live_logging_goes_on(uri, tmp_path):
    run_id = new_run(uri, "faults", "torn")
    down = RunLogger(dead_uri(), run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.2)
    for step in range(10):
        down.metrics({"loss": float(step)}, step=step)
    assert "NOT sent" in down.close(timeout_s=0.3)
    with down.spool.path.open("ab") as f:  # the crash came in the middle of writing step 10
        f.write(b'{"seq": 10, "kind": "metrics", "rows": [["loss", 10.0, 17')

    resumed = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    assert wait_for(lambda: resumed._queue.pending() == 0, 20)  # the spool goes out...
    for step in range(11, 20):
        resumed.metrics({"loss": float(step)}, step=step)
    assert wait_for(lambda: steps(uri, run_id, "loss")[-1:] == [19], 20)  # ...and so does live
    line = resumed.close(timeout_s=10)
    assert "; 1 entries LOST (torn line(s) in " in line, line
    assert steps(uri, run_id, "loss") == [s for s in range(20) if s != 10]
    run = client(uri).get_run(run_id)
    assert run.data.metrics[LOST_METRIC] == 1 and run.data.tags[LOST_TAG].startswith("entries=1 ")
    assert not list((tmp_path / "spool").iterdir())


def _replay(spool_dir: Path, uri: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.replay_tracking", "--tracking-uri", uri,
           "--spool-dir", str(spool_dir), *extra]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


@pytest.mark.integration  # two replay processes (each imports MLflow: seconds)
def test_a_replay_beside_a_live_sender_waits_or_refuses_and_nothing_is_sent_twice(uri, tmp_path):
    run_id = new_run(uri, "faults", "beside")
    spool_dir = tmp_path / "spool"
    down = RunLogger(dead_uri(), run_id, spool_dir=spool_dir, max_backoff_s=0.2)
    for step in range(30):
        down.metrics({"loss": float(step)}, step=step)
    assert "NOT sent" in down.close(timeout_s=0.3)

    # The live rank 0 of the resumed run holds the spool; its server is down for now, so the
    # spool stays on disk while two replays start beside it.
    net = Transport(uri, run_id)
    net.down = True
    live = TrackingQueue(net, Spool(spool_dir, run_id, lock=True), is_permanent=is_permanent,
                         max_backoff_s=0.2)  # fmt: skip
    for step in range(30, 45):
        live.put("metrics", rows=[["loss", float(step), 1000 + step, step]])
    refusing = _replay(spool_dir, uri)  # --wait-s 0: refuses at once
    waiting = _replay(spool_dir, uri, "--wait-s", "120")
    out, _ = refusing.communicate(timeout=120)
    assert refusing.returncode == 1, out
    assert f"left to its holder: tracking spool {spool_dir / run_id}.jsonl is in use" in out
    assert f"pid {os.getpid()}" in out
    assert waiting.poll() is None  # still waiting for the live side

    net.down = False
    for step in range(45, 60):
        live.put("metrics", rows=[["loss", float(step), 1000 + step, step]])
    assert live.close(timeout_s=30) == 0  # sent everything, released the spool
    out, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and "waiting for pid" in out, out
    assert steps(uri, run_id, "loss") == list(range(60))  # every step once
    assert not list(spool_dir.iterdir())


@pytest.mark.integration
def test_a_replay_to_a_server_that_lacks_the_run_touches_nothing(server, uri, tmp_path, capsys):
    from jobs.replay_tracking import main

    run_id = new_run(uri, "faults", "elsewhere")  # in the sqlite store, not on the server
    logger = RunLogger(dead_uri(), run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.2)
    for step in range(5):
        logger.metrics({"loss": float(step)}, step=step)
    assert "NOT sent" in logger.close(timeout_s=0.3)
    before = digest(tmp_path / "spool")
    capsys.readouterr()

    assert main(["--tracking-uri", server.uri, "--spool-dir", str(tmp_path / "spool")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has no run {run_id}" in err[0] and "left untouched" in err[0]
    assert digest(tmp_path / "spool") == before

    assert main(["--tracking-uri", uri, "--spool-dir", str(tmp_path / "spool")]) == 0
    assert steps(uri, run_id, "loss") == list(range(5))


def test_rejected_entries_go_to_dead_letters_and_are_not_counted_sent(uri, tmp_path):
    import json

    run_id = new_run(uri, "faults", "rejected")
    logger = RunLogger(dead_uri(), run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.2)
    for step in range(10):  # spooled, so one batch carries them all, the bad param among them
        logger.metrics({"loss": float(step)}, step=step)
        if step == 4:
            logger.params({"ok": 1})
            logger.params({"../escape": 1})  # a name MLflow refuses (HTTP 400 from a server)
            logger.tag("phase", "one")
    assert "NOT sent" in logger.close(timeout_s=0.3)

    again = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    queue = again._queue
    line = again.close(timeout_s=30)
    assert "1 rejected by the server, kept in" in line, line
    assert queue.sent == 12 + 2  # the spool's 13 but the rejected one, + the report (2 entries)
    assert steps(uri, run_id, "loss") == list(range(10))  # the rest of the batch, once
    run = client(uri).get_run(run_id)
    assert run.data.params == {"ok": "1"} and run.data.tags["phase"] == "one"
    assert run.data.metrics[REJECTED_METRIC] == 1
    dead = [json.loads(x) for x in again.spool.dead_path.read_text().splitlines()]
    assert [list(d["params"]) for d in dead] == [["../escape"]]
    assert "Invalid value" in dead[0]["error"]
    assert not again.spool.path.exists()


def test_a_full_disk_with_the_server_down_costs_counted_entries_never_the_run(uri, full_disk):
    """Nothing can be sent nor kept: every entry is lost, each counted, and closing the logger
    inside the run's block neither raises nor fails the finished run."""
    from PIL import Image

    run_id = new_run(uri, "faults", "nowhere")
    full_disk.fill()
    with tracked_run(uri, run_id):
        logger = RunLogger(dead_uri(), run_id, spool_dir=full_disk.path / "spool", max_memory=4,
                           max_backoff_s=0.2, spool_retry_s=0.2)  # fmt: skip
        for step in range(10):
            logger.metrics({"loss": float(step)}, step=step)
        logger.image(Image.new("RGB", (64, 64)), key="samples", step=9)
        logger.png(Image.new("RGB", (64, 64)), "samples/step_9.png")
        queue = logger._queue
        line = logger.close(timeout_s=1)
    assert queue.stats.lost == 12 and "; 12 entries LOST (" in line, line
    assert line.startswith("[tracking] 0 entries sent to ")
    assert client(uri).get_run(run_id).info.status == "FINISHED"
    files = full_disk.path / "spool" / f"{run_id}.files"
    assert not list(files.rglob("*.png"))  # no payload left behind for entries that are gone
