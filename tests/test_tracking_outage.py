"""Tracking never blocks or kills training: a real `mlflow server` on loopback (sqlite backend in
tmp, so its data survives a restart), killed and restarted while a RunLogger, then a real
pretraining run, logs to it."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.tracking import RunLogger, client, new_run
from pipeline.tracking.queue import OUTAGE_TAG
from servers import MlflowServer, wait_for


@pytest.fixture()
def server(tmp_path):
    s = MlflowServer(tmp_path)
    s.start()
    yield s
    s.kill()


@pytest.mark.slow
def test_logging_through_a_server_restart_loses_and_repeats_nothing(server, tmp_path):
    from PIL import Image

    run_id = new_run(server.uri, "outage", "logger")
    logger = RunLogger(server.uri, run_id, spool_dir=tmp_path / "spool", max_backoff_s=0.5)
    for step in range(10):
        logger.metrics({"loss": step / 10, "lr": 0.1}, step=step)
    assert wait_for(lambda: logger._queue.pending() == 0, 30)

    server.kill()
    slowest = 0.0
    for step in range(10, 30):
        t0 = time.perf_counter()
        logger.metrics({"loss": step / 10, "lr": 0.1}, step=step)
        if step == 20:
            logger.image(Image.new("RGB", (8, 8), (0, 255, 0)), key="samples", step=step)
            logger.png(Image.new("RGB", (8, 8)), "samples/step_20.png")
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.05)
    assert slowest < 0.1  # no call waits on the dead server
    assert wait_for(lambda: logger.spool.pending() >= 20, 10)  # written while down

    server.start()
    line = logger.close(timeout_s=60)
    assert line.startswith("[tracking] all ") and "outages=1" in line, line
    c = client(server.uri)
    for key, value in (("loss", lambda s: s / 10), ("lr", lambda s: 0.1)):
        rows = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        assert [(m.step, m.value) for m in rows] == [(s, value(s)) for s in range(30)], key
    assert not logger.spool.path.exists() and not logger.spool.files.exists()
    assert c.get_run(run_id).data.tags[OUTAGE_TAG].startswith("outages=1 seconds=")
    assert [a.path for a in c.list_artifacts(run_id, "samples")] == ["samples/step_20.png"]
    assert any("samples+step+20+" in a.path for a in c.list_artifacts(run_id, "images"))


@pytest.mark.slow
def test_pretraining_survives_a_tracking_server_outage(server, tmp_path, ray_local, cifar_dir):
    from test_pretrain_job import _wait_for_checkpoint, tiny

    from jobs.pretrain import main

    train, val = cifar_dir / "cifar10-train-000000.tar", cifar_dir / "cifar10-test-000000.tar"
    args = tiny(
        tmp_path, str(train), str(val),
        **{"run.tracking_uri": server.uri, "run.num_workers": 1, "run.run_name": "outage",
           "train.max_steps": 120, "train.checkpoint_every": 20, "train.sample_every": 40,
           "run.system_metrics_every_s": 1, "run.tracking_flush_timeout_s": 300},
    )  # fmt: skip
    events: list[str] = []

    def outage() -> None:
        _wait_for_checkpoint(tmp_path / "out" / "ray_results")
        server.kill()
        events.append("killed")
        time.sleep(5)
        server.start()
        events.append("restarted")

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    res = main(args)
    t.join(timeout=240)

    assert events == ["killed", "restarted"]
    assert res.metrics["step"] == 120
    c = client(server.uri)
    run = c.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss_rec", "loss_d"):
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, key))
        assert steps == list(range(2, 121, 2)), key  # every logged step, once
    val_steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "val_rec_l2"))
    assert val_steps == list(range(20, 121, 20))
    assert OUTAGE_TAG in run.data.tags
    assert any(k.startswith("system/") for k in run.data.metrics)
    images = [a.path for a in c.list_artifacts(run.info.run_id, "images")]
    assert sorted({int(p.split("+")[2]) for p in images}) == [40, 80, 120]
    assert "encoder" in {a.path for a in c.list_artifacts(run.info.run_id)}
    inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train_shards", "validation_shards"} and all(inputs.values())
    assert not list((tmp_path / "out" / "tracking_spool").glob("*.jsonl"))
