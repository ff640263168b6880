"""pipeline.tracking.queue / spool / send on a real sqlite MLflow store: the
outage is a real unreachable server (a loopback port nothing listens on), or a failure injected
at the transport boundary around the real sender; the spool is a real file."""

from __future__ import annotations

import json
import time

import pytest

from pipeline.tracking import RunLogger, client, new_run
from pipeline.tracking.queue import OUTAGE_TAG, TrackingQueue, take_batch
from pipeline.tracking.send import MlflowSender, is_permanent
from pipeline.tracking.spool import Spool
from servers import dead_uri


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    # One store for the module: creating a sqlite store runs MLflow's migrations (seconds).
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    rows = client(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(rows, key=lambda m: (m.timestamp, m.step))]


class Transport:
    """The real MLflow sender behind a switch: `down` refuses every batch (nothing applied),
    `lose_answers` applies a batch and then fails (a timeout after the server wrote it)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.send = MlflowSender(client(uri), run_id)
        self.down, self.lose_answers, self.calls = False, 0, 0

    def __call__(self, batch, ambiguous_upto) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        self.send(batch, ambiguous_upto)
        if self.lose_answers:
            self.lose_answers -= 1
            raise TimeoutError("read timed out")


def test_an_outage_is_spooled_then_sent_once_in_order(uri, tmp_path):
    run_id = new_run(uri, "queue", "outage")
    net = Transport(uri, run_id)
    spool = Spool(tmp_path / "spool", run_id)
    q = TrackingQueue(net, spool, is_permanent=is_permanent, max_backoff_s=0.1)
    slowest = 0.0
    for step in range(40):
        net.down = 10 <= step < 30
        if step == 10:
            time.sleep(0.3)  # the first ten are sent while the server is up
        t0 = time.perf_counter()
        q.put("metrics", rows=[["loss", step / 10, int(time.time() * 1000), step]])
        slowest = max(slowest, time.perf_counter() - t0)
        if step == 29:
            deadline = time.time() + 5
            while not spool.exists() and time.time() < deadline:
                time.sleep(0.05)
            assert spool.exists() and spool.pending() > 0  # written while down
    assert q.close(timeout_s=10) == 0
    assert slowest < 0.05  # a logging call never waits on the server
    assert history(uri, run_id, "loss") == [(s, s / 10) for s in range(40)]
    assert not spool.exists() and not spool.files.exists()
    assert q.stats.outages == 1 and q.stats.buffered >= 1
    tag = client(uri).get_run(run_id).data.tags[OUTAGE_TAG]
    assert tag.startswith("outages=1 ") and f"buffered={q.stats.buffered}" in tag


def test_a_batch_applied_without_an_answer_is_not_sent_twice(uri, tmp_path):
    run_id = new_run(uri, "queue", "ambiguous")
    net = Transport(uri, run_id)
    net.lose_answers = 2  # the first two batches reach the store, their answers are lost
    q = TrackingQueue(net, Spool(tmp_path / "spool", run_id), max_backoff_s=0.1)
    for step in range(12):
        q.put("metrics", rows=[["a", step, 1000 + step, step], ["b", -step, 1000 + step, step]])
        q.put("tags", tags={"last": str(step)})
    assert q.close(timeout_s=10) == 0
    assert net.calls > 2  # the lost answers were retried...
    assert history(uri, run_id, "a") == [(s, s) for s in range(12)]  # ...without duplicates
    assert history(uri, run_id, "b") == [(s, -s) for s in range(12)]
    assert client(uri).get_run(run_id).data.tags["last"] == "11"


def test_unsent_entries_wait_in_the_spool_and_a_resumed_logger_sends_them_first(uri, tmp_path):
    from PIL import Image

    run_id = new_run(uri, "queue", "resumed")
    down = RunLogger(dead_uri(), run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.2)
    for step in range(6):
        down.metrics({"loss": float(step)}, step=step)
    down.png(Image.new("RGB", (4, 4), (255, 0, 0)), "samples/step_5.png")
    down.image(Image.new("RGB", (4, 4)), key="samples", step=5)
    down.tag("phase", "first")
    line = down.close(timeout_s=0.5)
    assert "NOT sent" in line and "jobs.replay_tracking" in line and "resumes" in line
    assert down.spool.pending() == 9

    again = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")  # the resumed rank 0
    for step in range(6, 9):
        again.metrics({"loss": float(step)}, step=step)
    assert "all 12 entries sent" in again.close(timeout_s=10)
    assert history(uri, run_id, "loss") == [(s, float(s)) for s in range(9)]
    c = client(uri)
    assert [a.path for a in c.list_artifacts(run_id, "samples")] == ["samples/step_5.png"]
    images = [a.path for a in c.list_artifacts(run_id, "images")]
    assert len(images) == 2 and all("samples+step+5+" in p for p in images)  # png + preview
    assert c.get_run(run_id).data.tags["phase"] == "first"
    assert not list((tmp_path / "spool").iterdir())


def test_replay_skips_what_a_killed_sender_had_already_delivered(uri, tmp_path):
    """A rank 0 killed while a batch was on the wire: the store has it, the spool too, marked
    ambiguous. `jobs.replay_tracking` sends only what is missing."""
    from jobs.replay_tracking import main

    run_id = new_run(uri, "queue", "killed")
    down = RunLogger(dead_uri(), run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.2)
    for step in range(8):
        down.metrics({"loss": float(step)}, step=step)
    assert "NOT sent" in down.close(timeout_s=0.3)
    spool = Spool(tmp_path / "spool", run_id)
    entries = spool.head(100)
    assert [e["rows"][0][3] for e in entries] == list(range(8))
    delivered = entries[:3]  # what the store applied before the kill
    MlflowSender(client(uri), run_id)(delivered, -1)
    spool.write_state(inflight_upto=delivered[-1]["seq"])

    assert main(["--tracking-uri", uri, "--spool-dir", str(tmp_path / "spool")]) == 0
    assert history(uri, run_id, "loss") == [(s, float(s)) for s in range(8)]
    assert not spool.exists()
    with pytest.raises(FileNotFoundError, match="--spool-dir"):
        main(["--tracking-uri", uri, "--spool-dir", str(tmp_path / "nowhere")])


def test_a_corrupt_spool_line_is_skipped_and_counted(tmp_path):
    spool = Spool(tmp_path, "r")
    spool.append([{"seq": 0, "kind": "tags", "tags": {"a": "1"}}])
    with spool.path.open("a") as f:
        f.write('{"seq": 1, "kind": "ta')  # a line cut short by a hard kill
    spool.append([{"seq": 2, "kind": "tags", "tags": {"b": "2"}}])
    again = Spool(tmp_path, "r")
    assert [e["seq"] for e in again.head(10)] == [0, 2]  # the next append starts a new line
    assert again.skipped_lines >= 1 and again.last_seq == 2
    assert json.loads(spool.path.read_text().splitlines()[0])["seq"] == 0


def test_take_batch_respects_mlflow_limits_and_sends_files_alone():
    def metrics(seq: int, n: int) -> dict:
        return {"seq": seq, "kind": "metrics", "rows": [["k", 0.0, 0, seq]] * n}

    entries = [metrics(0, 600), metrics(1, 300), metrics(2, 200), metrics(3, 1)]
    assert [e["seq"] for e in take_batch(entries)] == [0, 1]  # 900 rows; +200 > 1000
    art = {"seq": 9, "kind": "artifact", "file": "x"}
    assert take_batch([art, metrics(10, 1)]) == [art]
    assert [e["seq"] for e in take_batch([metrics(0, 1), art])] == [0]
    assert take_batch([]) == []


def test_staging_a_payload_races_no_tidy_of_the_folder(tmp_path):
    """The training thread stages payload files while the sender tidies the payload folder
    away whenever the spool is empty: staging must never fail (a crash of the training step)."""
    import threading

    from pipeline.tracking.spool import Spool

    spool, errors, done = Spool(tmp_path, "run"), [], threading.Event()

    def sender() -> None:
        while not done.is_set():
            spool.tidy()

    t = threading.Thread(target=sender)
    t.start()
    try:
        for i in range(2000):
            try:
                path = spool.stage(f"{i}.png")
                path.write_bytes(b"x")
                spool.unstage(str(path))
            except OSError as e:  # pragma: no cover - the failure this test is about
                errors.append(e)
    finally:
        done.set()
        t.join()
    assert errors == []
