"""cluster/mlflow-server.yaml, held to what it promises: the MLflow server it describes, started
here from the manifest itself (its command, its environment, its allowed hosts) on a real
PostgreSQL and a real S3 endpoint (moto_server), serves the Service's names, refuses a foreign
Host header, and stores a real pretraining run's params and metrics in Postgres and its encoder
in the bucket.

Only what cannot exist on one machine is substituted: the bind address (127.0.0.1, not
0.0.0.0), the port (a free one, in --port and in the allowed hosts' ":5000"), one worker
process, and the Secrets' values (this test's database and bucket keys). Everything else is read
from the manifest, so the test fails when the manifest drifts: a dropped allowed host, a
backend URI no longer taken from the Secret, another artifact destination.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from servers import MotoS3, PostgresServer, free_port, postgres_bin, stop_group, wait_http

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "cluster" / "mlflow-server.yaml"
NAMESPACE = "default"  # the namespace the manifest's allowed hosts name
FOREIGN_HOST = "attacker.example.com"  # what a DNS-rebinding page would send


# ---- the manifest, read as Kubernetes would ------------------------------------------------


def manifest() -> dict[tuple[str, str], dict]:
    """{(kind, name): document} of cluster/mlflow-server.yaml."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def mlflow_container() -> dict:
    return containers(manifest()["Deployment", "mlflow"])[0]


def service_port() -> int:
    return manifest()["Service", "mlflow"]["spec"]["ports"][0]["port"]


def service_hosts(port: int | None) -> list[str]:
    """Every name a pod in the cluster may use for the Service, with and without `port`."""
    names = ["mlflow", f"mlflow.{NAMESPACE}", f"mlflow.{NAMESPACE}.svc",
             f"mlflow.{NAMESPACE}.svc.cluster.local"]  # fmt: skip
    return names + ([f"{n}:{port}" for n in names] if port else [])


def flag(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{MANIFEST.name}: the mlflow command has no {name}"
    return cmd[cmd.index(name) + 1]


def secret_refs() -> set[tuple[str, str]]:
    """(secret, key) of every secretKeyRef in the manifest, plus (secret, '*') for envFrom."""
    refs = set()
    for doc in manifest().values():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                refs.add((src["secretRef"]["name"], "*"))
    return refs


def server_command(port: int) -> list[str]:
    """The manifest's `mlflow server` command for this machine: loopback, a free port (also in
    the allowed hosts), one worker (two CPU cores here, shared)."""
    cmd = list(mlflow_container()["command"])
    listed = service_port()
    for name, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--workers", "1")):
        cmd[cmd.index(name) + 1] = value
    i = cmd.index("--allowed-hosts") + 1
    hosts = cmd[i].split(",")
    cmd[i] = ",".join(h.removesuffix(f":{listed}") + f":{port}" if h.endswith(f":{listed}")
                      else h for h in hosts)  # fmt: skip
    return cmd


def server_env(secret_values: dict[tuple[str, str], str], env_from: dict[str, dict]) -> dict:
    """The container's environment as the kubelet builds it: literal values, secretKeyRefs
    looked up in `secret_values` (a KeyError names a Secret this test does not provide),
    envFrom secrets from `env_from`; nothing else of this machine's MLFLOW_* / AWS_*."""
    c = mlflow_container()
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    for src in c.get("envFrom", []):
        env |= env_from[src["secretRef"]["name"]]
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret_values[ref["name"], ref["key"]]
    return env


# ---- static promises: no servers, unit tier -------------------------------------------------


def test_manifest_allowed_hosts_cover_every_service_name_with_and_without_port():
    cmd = mlflow_container()["command"]
    allowed = flag(cmd, "--allowed-hosts").split(",")
    missing = [h for h in service_hosts(service_port()) if h not in allowed]
    assert not missing, f"--allowed-hosts lacks {missing}"
    assert "*" not in allowed  # every host: the DNS-rebinding check off
    assert flag(cmd, "--port") == str(mlflow_container()["ports"][0]["containerPort"])


def test_manifest_is_production_shaped():
    docs = manifest()
    deployment = docs["Deployment", "mlflow"]
    # One server version writing at a time during a rollout (see the manifest's comment).
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1
    c = mlflow_container()
    assert flag(c["command"], "--artifacts-destination").startswith("s3://")
    assert "--backend-store-uri" not in c["command"]  # a password must not be in argv
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    for doc in (deployment, docs["StatefulSet", "mlflow-postgres"]):
        for container in containers(doc):
            res = container["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), container["name"]
            assert "memory" in res["limits"], container["name"]
    pvc = docs["StatefulSet", "mlflow-postgres"]["spec"]["volumeClaimTemplates"][0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_manifest_takes_credentials_only_from_secrets():
    docs = manifest()
    assert not [k for k in docs if k[0] == "Secret"], "no Secret (and no password) is shipped"
    words = ("PASSWORD", "SECRET", "TOKEN", "URI", "KEY", "USER")
    for doc in docs.values():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(doc):
                for e in c.get("env", []):
                    if any(w in e["name"] for w in words):
                        assert "secretKeyRef" in e.get("valueFrom", {}), e["name"]
    # cluster/README.md creates every Secret key the manifest reads.
    readme = (REPO / "cluster" / "README.md").read_text()
    for name, key in secret_refs():
        assert f"kubectl create secret generic {name}" in readme, name
        if key != "*":
            assert f"--from-literal={key}=" in readme, (name, key)


# ---- the live stack: PostgreSQL + moto S3 + the manifest's server ----------------------------


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL: the database the StatefulSet creates (POSTGRES_DB), a user and a
    password of this test's (the mlflow-db Secret's values)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        msg = "PostgreSQL server binaries not found (apt-get install postgresql; see README)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    pg_env = {
        e["name"]: e for e in containers(manifest()["StatefulSet", "mlflow-postgres"])[0]["env"]
    }
    pg = PostgresServer(bin_dir, "mlflow", secrets.token_hex(12), pg_env["POSTGRES_DB"]["value"])
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def bucket_s3(tmp_path_factory):
    """moto_server holding the bucket the manifest's --artifacts-destination names."""
    s3 = MotoS3(tmp_path_factory.mktemp("aws"))
    dest = flag(mlflow_container()["command"], "--artifacts-destination")
    bucket, _, prefix = dest.removeprefix("s3://").partition("/")
    try:
        client = s3.client()
        client.create_bucket(Bucket=bucket)
        yield s3, client, bucket, prefix
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def server(postgres, bucket_s3, tmp_path_factory):
    """`mlflow server` as the manifest runs it. Yields (uri, port)."""
    s3 = bucket_s3[0]
    values = {("mlflow-db", "uri"): postgres.uri, ("mlflow-db", "username"): postgres.user,
              ("mlflow-db", "password"): postgres.password}  # fmt: skip
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    env = server_env(values, {"mlflow-s3": {k: s3.env[k] for k in keys}})
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_command(port), env=env, cwd=log.parent, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        # The first start creates MLflow's schema in the empty database (the startupProbe's
        # allowance in the manifest covers this on a cluster).
        wait_http(f"http://127.0.0.1:{port}/health", 300, proc)
        yield f"http://127.0.0.1:{port}", port
    finally:
        stop_group(proc)
        if proc.returncode not in (0, -9):
            print(log.read_text()[-3000:])


def get(url: str, host: str) -> tuple[int, str]:
    """GET `url` with the Host header a client of that name sends; (status, body)."""
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.integration
def test_service_names_pass_the_host_check_and_a_foreign_host_is_refused(server):
    uri, port = server
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
    for host in service_hosts(port):
        status, body = get(api, host)
        assert status == 200, (host, status, body[:200])
        assert "Default" in body  # the default experiment, read from Postgres
    status, body = get(api, FOREIGN_HOST)
    assert status == 403 and "Invalid Host header" in body
    status, _ = get(api, f"{FOREIGN_HOST}:{port}")
    assert status == 403
    # The kubelet's probes send the pod's IP as Host: /health is exempt from the check (and is
    # why a start-up check on /health proves nothing about the API).
    assert get(f"{uri}/health", f"10.244.3.7:{port}")[0] == 200
    assert get(f"{uri}/health", FOREIGN_HOST)[0] == 200


@pytest.mark.slow
def test_pretraining_run_lands_in_postgres_and_the_bucket(
    server, postgres, bucket_s3, ray_local, cifar_dir, tmp_path, monkeypatch, capsys
):
    """A real pretraining run (1 worker, 4 steps) told where MLflow is only by
    MLFLOW_TRACKING_URI, as platforms set it on pods: the driver resolves it once and rank 0,
    a Ray worker that never saw the variable, logs to the same server."""
    from jobs.pretrain import main
    from pipeline.checkpoint import load_generator

    uri, port = server
    _, s3, bucket, prefix = bucket_s3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    res = main([
        f"data.train_shards={cifar_dir / 'cifar10-train-000000.tar'}",
        "data.image_size=32", "model.image_size=32", "model.width=8", "model.bottleneck=32",
        "data.batch_size=8", "data.shuffle_buffer=32", "train.max_steps=4", "train.log_every=2",
        "train.checkpoint_every=4", "train.sample_every=4", "run.num_workers=1",
        "run.max_failures=0", "run.system_metrics_every_s=0", "run.name=production-stack",
        f"run.output_root={out}", "run.run_name=prod-1",
    ])  # fmt: skip
    run_id = res.mlflow_run_id
    assert res.tracking_uri == uri and not (out / "mlflow.db").exists()
    printed = capsys.readouterr().out
    assert f"MLflow at {uri} (from MLFLOW_TRACKING_URI)" in printed
    (exp_id,) = postgres.query("SELECT experiment_id FROM runs WHERE run_uuid = %s", run_id)[0]
    url = f"{uri}/#/experiments/{exp_id}/runs/{run_id}"
    assert f"browse: {url}" in printed and res.run_url == url

    # Postgres holds the run: status, params, metrics at every logged step, tags.
    q = postgres.query
    assert q("SELECT status, name FROM runs WHERE run_uuid = %s", run_id) == [
        ("FINISHED", "prod-1")
    ]
    params = dict(q("SELECT key, value FROM params WHERE run_uuid = %s", run_id))
    assert params["train.max_steps"] == "4" and params["run.num_workers"] == "1"
    assert params["run.tracking_uri"] == uri  # resolved once, logged with the config
    steps = q("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'loss_rec' ORDER BY step",
              run_id)  # fmt: skip
    assert [s for (s,) in steps] == [2, 4]
    tags = dict(q("SELECT key, value FROM tags WHERE run_uuid = %s", run_id))
    assert tags["ce.tracking_uri_source"] == "MLFLOW_TRACKING_URI"
    assert tags["ce.tracking_uri"] == uri
    (location,) = q("SELECT artifact_location FROM experiments WHERE experiment_id = %s",
                    int(exp_id))[0]  # fmt: skip
    assert location.startswith("mlflow-artifacts:/")  # proxied: the pods need no bucket keys

    # The bucket holds the run's artifacts under the manifest's destination, the encoder that
    # evaluation loads (runs:/<id>/encoder/generator.pt) among them.
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{exp_id}/{run_id}/")
    keys = {o["Key"].split(f"/{run_id}/artifacts/", 1)[-1] for o in listed.get("Contents", [])}
    assert {"config.yaml", "encoder/generator.pt"} <= keys, keys
    # ... and the encoder as an MLflow Model: its row in Postgres, its files in the bucket.
    models = q("SELECT model_id, name FROM logged_models WHERE source_run_id = %s", run_id)
    assert [name for _, name in models] == ["encoder_model"]
    model_files = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{exp_id}/models/")
    assert any(models[0][0] in o["Key"] and o["Key"].endswith("MLmodel")
               for o in model_files.get("Contents", []))  # fmt: skip
    local = tmp_path / "generator.pt"
    s3.download_file(bucket, f"{prefix}/{exp_id}/{run_id}/artifacts/encoder/generator.pt",
                     str(local))  # fmt: skip
    g, cfg = load_generator(local)
    assert cfg.model.width == 8 and cfg.train.max_steps == 4
    assert sum(p.numel() for p in g.parameters()) > 0
