"""The pretrain job on a real local Ray, a real MLflow store in a temp dir, real CIFAR-10 shards."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.tracking import RUN_NAME_TAG, TrackingUnavailableError
from servers import MlflowServer

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, train: str, val: str, **extra: object) -> list[str]:
    """Overrides for a seconds-long run: 32 px, narrow nets, small batches."""
    base = {
        "data.train_shards": train,
        "data.val_shards": val,
        "data.image_size": 32,
        "model.image_size": 32,
        "model.width": 8,
        "model.bottleneck": 32,
        "data.batch_size": 8,
        "data.shuffle_buffer": 64,
        "train.max_steps": 12,
        "train.log_every": 2,
        "train.checkpoint_every": 6,
        "train.sample_every": 6,
        "train.eval_batches": 1,
        "run.output_root": str(tmp_path / "out"),
        "run.name": "test-pretrain",
        "run.num_workers": 2,
        "run.max_failures": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def mlflow_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    return c, runs


@pytest.fixture()
def cifar_small(cifar_dir: Path) -> tuple[str, str]:
    return str(cifar_dir / "cifar10-train-000000.tar"), str(cifar_dir / "cifar10-test-000000.tar")


def test_two_workers_complete_and_track(tmp_path, ray_local, cifar_small):
    from jobs.pretrain import main

    train, val = cifar_small
    res = main(tiny(tmp_path, train, val, **{"run.run_name": "two-workers"}))

    assert res.checkpoint_path is not None and Path(res.checkpoint_path, "checkpoint.pt").is_file()
    assert res.metrics["step"] == 12
    assert res.tracking_uri.startswith("sqlite:///") and str(tmp_path) in res.tracking_uri
    c, runs = mlflow_run(res.tracking_uri, "test-pretrain")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_NAME_TAG] == "two-workers"
    assert run.data.tags["ce.steps_per_rank"] == "12,12"  # both ranks ran every step
    assert run.data.params["train.max_steps"] == "12"
    assert run.data.params["run.num_workers"] == "2"
    # train.precision / channels_last default to auto: what they became on this machine.
    from pipeline.precision import capabilities, resolve

    resolved = resolve("auto", "auto", capabilities("cpu")).as_tags()
    assert {k: run.data.tags.get(k) for k in resolved} == resolved
    for key in ("loss_rec", "loss_g", "loss_d", "images_per_s", "val_rec_l2", "data_wait_s"):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["data_wait_frac"] <= 1
    history = c.get_metric_history(run.info.run_id, "loss_rec")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
    # Both ranks on this one node: its series once, gathered to rank 0 at every log step.
    assert {k.split("/")[1] for k in run.data.metrics if k.startswith("system/node")} == {"node0"}
    cpu = c.get_metric_history(run.info.run_id, "system/node0/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == [2, 4, 6, 8, 10, 12]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "encoder", "samples"} <= artifacts
    samples = [a.path for a in c.list_artifacts(run.info.run_id, "samples")]
    assert samples and all(p.endswith(".png") for p in samples)

    # The logged encoder is what evaluation loads by a runs:/ URI.
    import mlflow.artifacts

    from pipeline.checkpoint import load_generator

    uri = f"runs:/{run.info.run_id}/encoder/generator.pt"
    path = mlflow.artifacts.download_artifacts(uri, tracking_uri=res.tracking_uri)
    g, cfg = load_generator(path)
    assert cfg.model.width == 8 and cfg.data.image_size == 32
    assert sum(p.numel() for p in g.parameters()) > 0


def test_typo_key_fails_before_anything_starts(tmp_path):
    from jobs.pretrain import main

    with pytest.raises(ConfigError, match="max_stpes"):
        main(["train.max_stpes=3", f"run.output_root={tmp_path}"])
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        main(["train.max_steps=many", f"run.output_root={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_unreachable_tracking_server_fails_fast(tmp_path, cifar_small):
    from jobs.pretrain import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    args = tiny(tmp_path, *cifar_small, **{"run.tracking_uri": f"http://127.0.0.1:{port}"})
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port}"):
        main(args)
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out" / "ray_results").exists()


def test_missing_shards_fail_naming_the_pattern(tmp_path):
    from jobs.pretrain import main

    pattern = str(tmp_path / "nothing-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        main(tiny(tmp_path, pattern, ""))


def _env_without_session_ray(**extra: str) -> dict[str, str]:
    """The environment for a process that runs a Ray of its own: without the test session's
    API-server address (pipeline.runtime exports it), which would point that Ray's cleaner at
    the wrong cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_API_SERVER_ADDRESS"}
    return env | extra


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them `ray::RayTrainWorker...`)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker"):
                pids.append(int(d.name))
    return pids


def _wait_for_checkpoint(root: Path, timeout_s: float = 240) -> None:
    """Until Ray Train has *registered* a checkpoint. A checkpoint folder appears before the
    controller collects the report (it polls the workers), and a report still in flight when
    a worker dies is lost; the controller's snapshot file lists only registered ones."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        for snapshot in root.glob("*/checkpoint_manager_snapshot.json"):
            if json.loads(snapshot.read_text()).get("latest_checkpoint_result"):
                return
        time.sleep(0.2)
    raise TimeoutError(f"no registered checkpoint under {root} after {timeout_s}s")


@pytest.mark.slow
def test_killed_worker_recovers_from_checkpoint(tmp_path, ray_local, cifar_small):
    from jobs.pretrain import main

    args = tiny(
        tmp_path, *cifar_small,
        **{"run.run_name": "fault", "run.max_failures": 2, "train.max_steps": 400,
           "train.checkpoint_every": 20, "train.log_every": 20},
    )  # fmt: skip
    killed: list[int] = []

    def kill_one_worker() -> None:
        _wait_for_checkpoint(tmp_path / "out" / "ray_results")
        pids = _train_worker_pids()
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    res = main(args)
    killer.join(timeout=5)

    assert killed, "the test never found a worker to kill"
    assert res.metrics["step"] == 400
    c, runs = mlflow_run(res.tracking_uri, "test-pretrain")
    (run,) = runs
    resumed = c.get_metric_history(run.info.run_id, "resumed_from_step")
    assert resumed and all(m.value >= 20 and m.value % 20 == 0 for m in resumed)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_rerun_with_same_name_resumes(tmp_path, cifar_small):
    """Stop the driver process after its first checkpoint, run the same command again."""
    args = tiny(
        tmp_path, *cifar_small,
        **{"run.run_name": "resumable", "run.num_workers": 1, "train.max_steps": 300,
           "train.checkpoint_every": 20, "train.log_every": 20},
    )  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.pretrain", *args]
    env = _env_without_session_ray(PYTHONUNBUFFERED="1", RAY_ADDRESS="")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_checkpoint(tmp_path / "out" / "ray_results")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert "(resumed)" in second.stdout
    uri = "sqlite:///" + str((tmp_path / "out" / "mlflow.db").resolve())
    c, runs = mlflow_run(uri, "test-pretrain")
    (run,) = runs  # the same MLflow run continued, not a second one
    resumed = c.get_metric_history(run.info.run_id, "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].value >= 20 and resumed[0].value % 20 == 0
    assert run.info.status == "FINISHED"
    assert max(m.step for m in c.get_metric_history(run.info.run_id, "loss_rec")) == 300


def test_shipped_yaml_configs_are_valid():
    from pipeline.search import build_space, load_settings

    paths = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        if path.name.startswith("tune_"):  # a search: its base config and its space
            settings, base = load_settings(path)
            assert build_space(settings, base)
        elif path.name.startswith("finetune_"):  # a fine-tune (pipeline.finetune.settings)
            from pipeline.finetune import load_finetune_config

            ft = load_finetune_config(path)
            assert ft.model.image_size == ft.data.image_size, path
        else:
            cfg = load_config(path)
            assert cfg.model.image_size == cfg.data.image_size, path


def test_shipped_configs_validate_on_training_images_never_on_test(cifar_dir):
    """Every choice reads data.val_shards: in the shipped configs it is carved from training
    images (a -val- split or a train shard), disjoint from the shards trained on."""
    from pipeline.data import expand_urls

    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        if path.name.startswith(("tune_", "finetune_")):  # finetune: val carved (test_finetune)
            continue
        cfg = load_config(path)
        assert cfg.data.val_shards, path
        assert "test" not in cfg.data.val_shards.lower(), path
        if "cifar10" in cfg.data.train_shards:
            rebased = (s.replace("../shared/datasets/cifar10", str(cifar_dir))
                       for s in (cfg.data.train_shards, cfg.data.val_shards))  # fmt: skip
            train, val = (set(expand_urls(s)) for s in rebased)
            assert len(train) == 9 and len(val) == 1 and not train & val, path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_to_a_started_cluster(tmp_path, cifar_small):
    """`ray start --head`, then `ray job submit` of the job, as a user on a cluster would."""
    gcs, dash, agent, agent_grpc, env_agent, metrics = (_free_port() for _ in range(6))
    # Ray 2.60 turns on token auth when ~/.ray/auth_token exists (a local ray.init may write
    # it), and the job CLI then needs RAY_AUTH_MODE=token. Both sides bind to 127.0.0.1 here,
    # so the test pins the mode instead of depending on what earlier runs left in $HOME.
    env = _env_without_session_ray(RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # the test session's own Ray already holds the default agent ports
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )  # fmt: skip
    try:
        args = tiny(tmp_path, *cifar_small, **{"run.run_name": "submitted"})
        submit = [
            "ray", "job", "submit", "--address", f"http://127.0.0.1:{dash}",
            "--working-dir", str(REPO), "--", "python", "-m", "jobs.pretrain", *args,
        ]  # fmt: skip
        for _ in range(60):  # the dashboard takes a few seconds to come up
            out = subprocess.run(submit, capture_output=True, text=True, timeout=400, env=env)
            not_ready = ("Failed to connect", "No available agent")  # head still starting
            if not any(m in out.stdout + out.stderr for m in not_ready):
                break
            time.sleep(2)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "succeeded" in log and "Ray cluster at" in log
        # What `ray job logs --follow` shows: rank 0's progress lines (pipeline/progress.py).
        assert "[train] step 12/12 (100%)" in log and "[train] done: step 12/12" in log, log[-4000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    uri = "sqlite:///" + str((tmp_path / "out" / "mlflow.db").resolve())
    _, runs = mlflow_run(uri, "test-pretrain")
    assert [r.data.tags[RUN_NAME_TAG] for r in runs] == ["submitted"]
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_against_an_mlflow_server(tmp_path, ray_local, cifar_small):
    """A real `mlflow server` on loopback: params, metrics and artifacts go over HTTP."""
    from jobs.pretrain import main

    server = MlflowServer(tmp_path)
    server.start()
    uri = server.uri
    try:
        res = main(tiny(tmp_path, *cifar_small, **{"run.tracking_uri": uri,
                   "run.num_workers": 1, "run.run_name": "served"}))  # fmt: skip
        c, (run,) = mlflow_run(uri, "test-pretrain")
        assert run.info.run_id == res.mlflow_run_id and run.info.status == "FINISHED"
        assert run.data.params["run.tracking_uri"] == uri
        assert "loss_rec" in run.data.metrics
        assert "encoder" in {a.path for a in c.list_artifacts(run.info.run_id)}
    finally:
        server.kill()  # a throwaway server: no graceful shutdown
    assert not (tmp_path / "out" / "mlflow.db").exists()  # nothing fell back to a local store
    assert list((tmp_path / "artifacts").rglob("generator.pt"))  # stored by the server
