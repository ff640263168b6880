"""Where a job's files go: a local folder or an object-storage URI (s3://, gs://, ...).

    is_uri / scheme          classify `run.output_root` (and any other root) without touching it
    absolute / join          a local path made absolute, a URI kept verbatim: never Path.resolve()
                             on a URI, which turns s3://bucket/x into <cwd>/s3:/bucket/x
    local_root               the local folder for files that must stay local (feature cache,
                             report files) when the root is a URI
    default_sqlite_uri       MLflow's default store under a root, or an error for a URI root
    require_filesystem       an fsspec scheme usable here, else an error naming the extra
    check_output_root        the root opened through pyarrow (what Ray Train uses), before Ray
    fs_uri                   a (pyarrow filesystem, path) pair back to a URI, for messages

Credentials and endpoints come from the standard environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...), which s3fs, pyarrow and boto3 (MLflow)
all read: there is no endpoint setting of our own to keep in sync with three libraries.
Imports nothing from the pipeline, so `pipeline.config` can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

# Schemes Ray Train's storage (pyarrow.fs.FileSystem.from_uri) opens. fsspec opens more for
# shards, but a run's output root has to be one Ray can write checkpoints to.
OUTPUT_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
# The pip extra that brings an fsspec implementation, for the error message.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# pyarrow filesystem type_name -> URI scheme (GcsFileSystem's type is "gcs", users write gs://).
_PYARROW_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


def scheme(path: str) -> str:
    """'' for a local path, else the URI's scheme, lower case ('s3', 'gs', 'file', ...)."""
    if "://" not in path:
        return ""
    return urlparse(path).scheme.lower()


def is_uri(path: str) -> bool:
    """True for object storage and other remote URIs; False for local paths and file://."""
    return scheme(path) not in ("", "file")


def absolute(path: str) -> str:
    """A URI as given (no trailing slash); a local path (or file://) made absolute, since Ray
    workers and `ray job submit` run in other directories."""
    if is_uri(path):
        return path.rstrip("/")
    if scheme(path) == "file":
        path = urlparse(path).path
    return str(Path(path).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    """`root/part/...`: with '/' for a URI (never through Path, which would fold '//')."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def local_root(root: str) -> Path:
    """The local folder for what a job must keep on local disk (feature caches, report files
    before they are logged to MLflow): `root` itself when it is local, else a mirror of the URI
    under $XDG_CACHE_HOME/context-encoders (~/.cache/...), e.g.
    s3://bucket/out -> ~/.cache/context-encoders/s3/bucket/out. Everything there can be
    rebuilt, or has already been logged to MLflow."""
    if not is_uri(root):
        return Path(absolute(root))
    u = urlparse(root)
    parts = [p for p in f"{u.netloc}/{u.path}".split("/") if p and p not in (".", "..")]
    return _cache_home() / "context-encoders" / u.scheme.lower() / Path(*parts)


def default_sqlite_uri(root: str, key: str = "run.tracking_uri") -> str:
    """sqlite:///<root>/mlflow.db, absolute. A URI root has no such default: sqlite needs a
    local file with locking, and a database quietly written to one machine's disk would be lost
    with its pod. Raises ValueError naming `key` and what to set instead."""
    if is_uri(root):
        raise ValueError(
            f"{key} must be set when the output root is an object-storage URI ({root}): "
            "MLflow's default sqlite store cannot live in a bucket. Use an MLflow server "
            "(`mlflow server --artifacts-destination s3://...`, then http://host:port) or "
            "sqlite:////ABSOLUTE/LOCAL/PATH.db"
        )
    return "sqlite:///" + str(Path(absolute(root)) / "mlflow.db")


def require_filesystem(url: str, key: str) -> None:
    """Fail before Ray starts when no fsspec implementation opens `url` (s3fs for s3://, gcsfs
    for gs://): fsspec would otherwise fail inside every worker. Local paths always pass."""
    s = scheme(url)
    if s in ("", "file", "pipe", "http", "https"):  # opened without fsspec (pipeline.data.open)
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(s)
    except ImportError as e:
        extra = EXTRAS.get(s)
        hint = f"pip install 'context-encoders[{extra}]'" if extra else "install its fsspec package"
        raise ImportError(
            f"{key}: {url} needs an fsspec filesystem for {s}://; {hint} ({e})"
        ) from e
    except ValueError as e:
        raise ValueError(f"{key}: {url}: unknown URL scheme {s!r} ({e})") from e


def check_output_root(root: str, key: str = "run.output_root") -> None:
    """Open `root` the way Ray Train will (pyarrow.fs.FileSystem.from_uri) and look at it once,
    so a bad scheme, an unknown bucket region or refused credentials fail here, naming `key`,
    not minutes later in a worker. Local roots pass (Ray creates the folder)."""
    if not is_uri(root):
        return
    if scheme(root) not in OUTPUT_SCHEMES:
        raise ValueError(f"{key}: {root}: Ray Train cannot write to {scheme(root)}:// "
                         f"(use a local path or one of {', '.join(OUTPUT_SCHEMES)})")  # fmt: skip
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
        fs.get_file_info(path)  # a missing prefix is fine; a refused request raises
    except (OSError, ValueError) as e:
        raise OSError(f"{key}: cannot open {root}: {e}") from e


def fs_uri(filesystem, path: str) -> str:
    """A URI for `path` on a pyarrow filesystem (as Ray Train's Checkpoint holds them):
    ('s3', 'bucket/out/x') -> 's3://bucket/out/x'; a local path is returned as it is."""
    s = _PYARROW_SCHEMES.get(getattr(filesystem, "type_name", "local"))
    return f"{s}://{path.lstrip('/')}" if s else path
