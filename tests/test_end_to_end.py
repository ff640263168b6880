"""The README's main job, end to end on the embedded default, with a tiny budget."""

from __future__ import annotations

import pytest

ARGS = ["--steps", "8", "--trials", "2", "--trial-steps", "4", "--layers", "bottleneck"]


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    from jobs.end_to_end import main

    root = tmp_path / "e2e"
    probe_run = main(["--output-root", str(root), *ARGS])
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


@pytest.mark.slow
def test_selection_never_reads_the_test_split(tmp_path, ray_local):
    """Pretraining and the search (every choice the job makes) run with the test shards gone:
    they choose on val alone. The probe, run after they are back, is the only reader of test."""
    import time

    from jobs.end_to_end import make_digit_shards, parse_args, select_encoders

    root = tmp_path / "e2e"
    splits = make_digit_shards(root / "shards" / "digits")
    test_shards = sorted((root / "shards" / "digits").glob("digits-test-*.tar"))
    assert test_shards and list((root / "shards" / "digits").glob("digits-val-*.tar"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for p in test_shards:
        p.rename(hidden / p.name)
    chosen = select_encoders(root, splits, parse_args(ARGS), "hidden-test", time.perf_counter())
    assert chosen.tune_best_uri.startswith("runs:/") and chosen.best_config_path.is_file()
    assert "digits-test" not in chosen.best_config_path.read_text()
