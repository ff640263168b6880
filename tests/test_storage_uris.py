"""pipeline.storage and its callers: object-storage URIs are never resolved as local paths.

Offline and fast: gs:// cannot be served here, so what is checked for it is the URI handling
(what Ray Train, MLflow and fsspec are handed). tests/test_object_storage.py runs s3:// end to
end against a real S3 server on loopback.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pyarrow.fs
import pytest

from pipeline.config import Config, ConfigError, RunConfig, load_config, tracking_uri
from pipeline.ray_train import storage_path
from pipeline.runtime import resolve_paths
from pipeline.storage import (
    absolute,
    check_output_root,
    default_sqlite_uri,
    fs_uri,
    is_uri,
    join,
    local_root,
    require_filesystem,
)


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("s3://bucket/out", "s3://bucket/out/ray_results"),
        ("s3://bucket/out/", "s3://bucket/out/ray_results"),
        ("gs://bucket/a/b", "gs://bucket/a/b/ray_results"),
        ("gcs://bucket", "gcs://bucket/ray_results"),
    ],
)
def test_storage_path_keeps_uris(root, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old bug: <cwd>/s3:/bucket/out
    assert storage_path(root) == expected


def test_storage_path_local_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage_path("out") == str(tmp_path.resolve() / "out" / "ray_results")
    assert storage_path(f"file://{tmp_path}/o") == str(tmp_path.resolve() / "o" / "ray_results")


@pytest.mark.parametrize(
    ("path", "uri"),
    [("s3://b/x", True), ("gs://b", True), ("file:///tmp/x", False), ("rel/x", False),
     ("/abs/x", False), ("C:/x", False)],
)  # fmt: skip
def test_is_uri(path, uri):
    assert is_uri(path) is uri


def test_absolute_resolves_local_paths_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("s3://b/x/") == "s3://b/x"
    assert absolute("rel") == str(tmp_path.resolve() / "rel")
    assert absolute(f"file://{tmp_path}/a/../b") == str(tmp_path.resolve() / "b")


def test_join_never_folds_the_double_slash():
    assert join("gs://b/", "x/", "/y") == "gs://b/x/y"
    assert join("/tmp/a", "b", "c") == "/tmp/a/b/c"


def test_resolve_paths_keeps_uris_and_absolutises_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data, train_shards="gs://b/s/tr-{000..003}.tar, rel/v.tar", val_shards="s3://b/v"
        ),
        run=dataclasses.replace(cfg.run, output_root="gs://bucket/out/"),
    )
    out = resolve_paths(cfg)
    assert out.run.output_root == "gs://bucket/out"
    assert out.data.train_shards == f"gs://b/s/tr-{{000..003}}.tar,{tmp_path.resolve()}/rel/v.tar"
    assert out.data.val_shards == "s3://b/v"
    local = resolve_paths(dataclasses.replace(cfg, run=RunConfig(output_root="o")))
    assert local.run.output_root == str(tmp_path.resolve() / "o")


def test_uri_output_root_needs_a_tracking_uri():
    with pytest.raises(ConfigError, match="run.tracking_uri must be set"):
        load_config(None, ["run.output_root=s3://bucket/out"])
    with pytest.raises(ConfigError, match="run.tracking_uri"):
        tracking_uri(RunConfig(output_root="gs://bucket/out"))
    cfg = load_config(None, ["run.output_root=gs://b/o", "run.tracking_uri=http://h:5000"])
    assert tracking_uri(cfg.run) == "http://h:5000"


def test_local_output_root_keeps_the_sqlite_default(tmp_path):
    assert tracking_uri(RunConfig(output_root=str(tmp_path))) == f"sqlite:///{tmp_path}/mlflow.db"
    assert default_sqlite_uri(str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="--my-key must be set"):
        default_sqlite_uri("s3://b/o", "--my-key")


def test_output_root_scheme_ray_cannot_write_is_a_config_error():
    with pytest.raises(ConfigError, match="run.output_root: 'http://h/o'"):
        load_config(None, ["run.output_root=http://h/o", "run.tracking_uri=http://h:5000"])
    with pytest.raises(ValueError, match="run.output_root: memory://x"):
        check_output_root("memory://x")
    check_output_root("relative/local")  # local roots are Ray's to create


def test_local_root_mirrors_a_uri_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert local_root("s3://bkt/out/") == tmp_path / "context-encoders" / "s3" / "bkt" / "out"
    assert local_root("gs://bkt/../x") == tmp_path / "context-encoders" / "gs" / "bkt" / "x"
    monkeypatch.chdir(tmp_path)
    assert local_root("o") == tmp_path.resolve() / "o"


def test_probe_with_a_uri_root_and_no_tracking_uri_fails_before_work(tmp_path, monkeypatch):
    from evaluation.run import ProbeRunConfig, run_probe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = ProbeRunConfig(encoders={}, train_shards="x", test_shards="y", output_root="s3://b/o")
    with pytest.raises(ValueError, match="tracking_uri must be set"):
        run_probe(cfg)
    assert not any(tmp_path.iterdir())


def test_fs_uri_turns_pyarrow_paths_back_into_uris():
    s3 = pyarrow.fs.S3FileSystem(anonymous=True, region="us-east-1")
    assert (
        fs_uri(s3, "bkt/out/ray_results/r/checkpoint_0")
        == "s3://bkt/out/ray_results/r/checkpoint_0"
    )
    gcs = pyarrow.fs.GcsFileSystem(anonymous=True)
    assert fs_uri(gcs, "bkt/o") == "gs://bkt/o"
    assert fs_uri(pyarrow.fs.LocalFileSystem(), "/tmp/o") == "/tmp/o"


def test_require_filesystem_names_the_key_and_the_extra():
    require_filesystem("/local/shard.tar", "data.train_shards")
    require_filesystem("pipe:cat x.tar", "data.train_shards")
    with pytest.raises(ValueError, match="data.val_shards: nosuch://b/x.tar"):
        require_filesystem("nosuch://b/x.tar", "data.val_shards")
    if importlib.util.find_spec("gcsfs") is None:
        with pytest.raises(ImportError, match=r"context-encoders\[gcs\]"):
            require_filesystem("gs://b/x.tar", "data.train_shards")
    else:
        require_filesystem("gs://b/x.tar", "data.train_shards")
    if importlib.util.find_spec("s3fs") is not None:  # the dev extra installs it
        require_filesystem("s3://b/x.tar", "data.train_shards")


def test_remote_glob_lists_every_matching_shard():
    """fsspec's in-memory filesystem stands in for a bucket: the glob goes through the same
    fsspec listing an s3:// or gs:// glob does."""
    import uuid

    import fsspec

    from pipeline.data.urls import expand_urls

    fs, root = fsspec.filesystem("memory"), f"/shards-{uuid.uuid4().hex}"
    for name in ("s-000002.tar", "s-000000.tar", "s-000001.tar", "other.txt"):
        fs.pipe(f"{root}/{name}", b"x")
    try:
        urls = expand_urls(f"memory://{root}/s-*.tar")
        assert [u.rsplit("/", 1)[1] for u in urls] == [f"s-00000{i}.tar" for i in range(3)]
        assert all(u.startswith("memory://") for u in urls)
    finally:
        fs.rm(root, recursive=True)
