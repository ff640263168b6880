"""The README's main job, end to end on the embedded default, with a tiny budget."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.end_to_end import main

    root = tmp_path / "e2e"
    probe_run = main(["--output-root", str(root), "--steps", "8", "--trials", "2",
                      "--trial-steps", "4", "--layers", "bottleneck"])  # fmt: skip
    out = capsys.readouterr().out
    assert "mlflow ui --host 127.0.0.1" in out and str(root / "mlflow.db") in out

    shards = root / "shards" / "digits"
    assert (shards / "manifest.json").is_file() and list(shards.glob("digits-train-*.tar"))
    c = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiments = {e.name: e.experiment_id for e in c.search_experiments()}
    assert {"digits", "digits-probe"} <= set(experiments)
    runs = c.search_runs([experiments["digits"]])
    pretrain = [r for r in runs if r.data.tags.get("ce.run_name", "").startswith("digits-")]
    search = [r for r in runs if r.data.tags.get("ce.kind") == "search"]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(pretrain) == 1 and len(search) == 1 and len(trials) == 2
    assert all(r.info.status == "FINISHED" for r in pretrain + search)
    # ASHA may stop a trial early: it is closed as KILLED and tagged, never left RUNNING.
    for r in trials:
        assert r.info.status == "FINISHED" or (
            r.info.status == "KILLED" and r.data.tags["ce.stopped_early"] == "true"
        )

    metrics = c.get_run(probe_run).data.metrics
    for encoder in ("pretrained", "tune_best", "random_init"):
        top1 = metrics[f"probe_top1/{encoder}/bottleneck"]
        assert 0.1 < top1 <= 1.0  # 10 digit classes: any working encoder is above chance
    assert metrics["probe_top1/raw_pixels/pixels"] > 0.8  # digits are easy from pixels
