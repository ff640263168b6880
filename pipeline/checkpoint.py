"""Checkpoint files: written atomically, read with `torch.load(weights_only=True)`; checkpoint
folders in run storage: uploaded with their proof of completeness last, and chosen at resume.

A training checkpoint is `Trainer.state_dict()`: {"generator", "discriminator", "opt_g",
"opt_d", "step", "epoch", "batch_in_epoch", "config", "rng"}. An encoder file (for evaluation)
is {"config", "generator"}. Both hold only tensors, numbers, strings, lists and dicts, so the
safe unpickler loads them; configs are stored as `pipeline.config.to_dict` dicts.

Checkpoint folders (what Ray Train keeps under <storage>/<run>/checkpoint_<time>/) hold the
checkpoint file and `checkpoint_manifest.json` ({"step", "files": {name: {"bytes", "sha256"}}}),
which the upload writes after every other file: a folder whose manifest is missing, or whose
files do not match it, was cut off mid-upload (or damaged since) and is never resumed from.
`choose_checkpoint` picks the newest complete folder of a run. Storage is a pyarrow filesystem
(local, s3://, gs://): no Ray here; pipeline.ray_train passes Ray's storage in. See
docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from pipeline.config import Config, from_dict, to_dict
from pipeline.model import Generator, build_generator
from pipeline.retry import Retrier, RetriesExhaustedError, RetryPolicy

log = logging.getLogger(__name__)

MANIFEST_FILE = "checkpoint_manifest.json"
CHECKPOINT_FILE = "checkpoint.pt"  # the training state inside a checkpoint folder
CHECKPOINT_DIR_PREFIX = "checkpoint_"  # Ray Train's default checkpoint folder names
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
# Test-only fault injection: "<step>:<marker file>" makes the upload of the checkpoint at that
# step kill its own process (SIGKILL) after writing half the checkpoint file, once (the marker
# file records that it happened, so the restarted run gets past that step).
KILL_ENV = "CE_TEST_KILL_DURING_CHECKPOINT"
_COPY_CHUNK = 8 << 20
# Resume reads (manifests, checkpoint downloads): run.upload_retries' defaults, unless given.
READ_RETRIES = RetryPolicy(retries=3, backoff_s=1.0)
_URI_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}  # pyarrow type_name


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temp file in the same directory, fsync, then
    os.replace, so a crash mid-write never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The dict `save_checkpoint` wrote, on CPU, via the safe (weights_only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_encoder(path: str | Path, g: Generator, cfg: Config) -> None:
    """The generator (encoder + decoder) and the run config, for evaluation and inpainting."""
    save_checkpoint(path, {"config": to_dict(cfg), "generator": g.state_dict()})


def load_generator(path: str | Path) -> tuple[Generator, Config]:
    """(generator in eval mode, its run config) from a training checkpoint or an encoder file.
    Raises naming the file and the config when the weights do not fit the architecture."""
    state = load_checkpoint(path)
    missing = [k for k in ("config", "generator") if k not in state]
    if missing:
        raise KeyError(f"{path}: not a checkpoint or encoder file (missing {missing})")
    cfg = from_dict(state["config"])
    g = build_generator(cfg.model)
    try:
        g.load_state_dict(state["generator"])
    except RuntimeError as err:
        raise RuntimeError(
            f"{path}: generator weights do not match the architecture its config describes "
            f"({cfg.model}): {err}"
        ) from err
    return g.eval(), cfg


# ---- completeness ----------------------------------------------------------------------------


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder lacks its manifest or its files do not match it."""


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be written to run storage, even after retries."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    folder: str | Path, step: int, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write `folder/checkpoint_manifest.json`: size and sha256 of every other file in it, and
    the run's config (a `to_dict` dict) with its fingerprint (pipeline.identity), which a rerun
    of the same run name is checked against before it starts."""
    from pipeline.identity import fingerprint

    folder = Path(folder)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    manifest: dict[str, Any] = {"step": int(step), "files": files}
    if config is not None:
        manifest |= {"config": config, "config_fingerprint": fingerprint(config)}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def check_complete(folder: str | Path) -> dict[str, Any]:
    """The manifest of a local checkpoint folder whose files all match it; raises
    IncompleteCheckpointError saying what is missing or wrong."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files, step = manifest["files"], int(manifest["step"])
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{folder}: no {MANIFEST_FILE} (upload cut off)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IncompleteCheckpointError(f"{folder}: unreadable {MANIFEST_FILE}: {e}") from e
    if not files:
        raise IncompleteCheckpointError(f"{folder}: {MANIFEST_FILE} lists no files")
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise IncompleteCheckpointError(f"{folder}: {name} is missing")
        if p.stat().st_size != want["bytes"]:
            raise IncompleteCheckpointError(
                f"{folder}: {name} is {p.stat().st_size} bytes, its manifest says {want['bytes']}"
            )
        if _sha256(p) != want["sha256"]:
            raise IncompleteCheckpointError(f"{folder}: {name} does not match its sha256")
    manifest["step"] = step
    return manifest


# ---- storage: upload, list, choose -----------------------------------------------------------


def storage_uri(fs: pafs.FileSystem, path: str) -> str:
    """`path` on `fs` as a user would write it (s3://bucket/key, gs://..., or a local path)."""
    scheme = _URI_SCHEMES.get(fs.type_name)
    return f"{scheme}://{path}" if scheme else path


def upload_checkpoint_dir(
    local: str | Path, fs: pafs.FileSystem, dest: str, policy: RetryPolicy, step: int = -1
) -> None:
    """Copy a local checkpoint folder to `dest` on `fs`, its manifest last, retrying the whole
    copy on transient errors per `policy`; raises CheckpointUploadError naming `dest`."""
    local = Path(local)
    names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    if not (local / MANIFEST_FILE).is_file():
        raise CheckpointUploadError(f"{local}: no {MANIFEST_FILE}; write_manifest first")
    uri = storage_uri(fs, dest)

    def copy_all() -> None:
        fs.create_dir(dest, recursive=True)
        for name in names:
            _copy_file(local / name, fs, f"{dest}/{name}", step)
        _fsync_local(fs, dest, names)  # the files are on disk before the proof that they are
        _copy_file(local / MANIFEST_FILE, fs, f"{dest}/{MANIFEST_FILE}", step)  # the proof, last
        _fsync_local(fs, dest, [MANIFEST_FILE])

    try:
        Retrier(policy, f"checkpoint upload to {uri}").call(copy_all)
    except Exception as err:
        raise CheckpointUploadError(
            f"could not write checkpoint to {uri} ({type(err).__name__}); check the run "
            "storage (run.output_root / storage path) is reachable and writable"
        ) from err


def _copy_file(src: Path, fs: pafs.FileSystem, dst: str, step: int) -> None:
    kill_at = _test_kill_point(step, src)
    with open(src, "rb") as f, fs.open_output_stream(dst) as out:
        if kill_at is not None:
            out.write(f.read(kill_at))
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # test-only: die with half the file written
        while chunk := f.read(_COPY_CHUNK):
            out.write(chunk)


def _fsync_local(fs: pafs.FileSystem, dest: str, names: list[str]) -> None:
    """On local storage, flush `names` in `dest`, `dest` itself and its parent to disk: a
    power cut after the upload returned must not lose a checkpoint Ray Train has registered
    (and may have pruned older ones for). Object stores acknowledge only durable writes."""
    if fs.type_name != "local":
        return
    for name in names:
        fd = os.open(os.path.join(dest, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for folder in (dest, os.path.dirname(dest.rstrip("/"))):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _test_kill_point(step: int, src: Path) -> int | None:
    """The byte to die at when CE_TEST_KILL_DURING_CHECKPOINT targets this step (tests only)."""
    spec = os.environ.get(KILL_ENV, "")
    if not spec or src.name == MANIFEST_FILE:
        return None
    at_step, _, marker = spec.partition(":")
    if int(at_step) != step or not marker or os.path.exists(marker):
        return None
    Path(marker).write_text(f"killed uploading {src.name} at step {step}\n")
    return src.stat().st_size // 2


def checkpoint_dirs(
    fs: pafs.FileSystem, run_path: str, policy: RetryPolicy = READ_RETRIES
) -> list[str]:
    """Paths of the run's checkpoint folders (complete or not), in name order; the listing is
    retried on transient errors (past `policy`: CheckpointReadError)."""
    selector = pafs.FileSelector(run_path, allow_not_found=True)
    uri = storage_uri(fs, run_path)
    try:
        infos = Retrier(policy, f"listing {uri}").call(lambda: fs.get_file_info(selector))
    except RetriesExhaustedError as e:
        raise CheckpointReadError(_unreadable(uri, e)) from e
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_DIR_PREFIX)
    )


class CheckpointReadError(RuntimeError):
    """A stored checkpoint could not be read for a transient reason, even after retries: the
    resume stops rather than fall back to an older checkpoint (and let the newer be pruned)."""


def _read_manifest(fs: pafs.FileSystem, path: str, policy: RetryPolicy) -> dict[str, Any] | None:
    """A stored folder's manifest, or None when it has none (cut off) or it is not a manifest.
    Transient errors are retried per `policy`; past it, CheckpointReadError."""

    def read() -> bytes:
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
            return f.read()

    uri = storage_uri(fs, f"{path}/{MANIFEST_FILE}")
    try:
        manifest = json.loads(Retrier(policy, f"reading {uri}").call(read))
        int(manifest["step"])
        return manifest
    except RetriesExhaustedError as e:
        raise CheckpointReadError(_unreadable(uri, e)) from e
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    except OSError as e:  # pyarrow reports a missing file on some stores as a plain OSError
        log.warning("checkpoint %s: cannot read its manifest: %s", storage_uri(fs, path), e)
        return None


def _unreadable(uri: str, err: BaseException) -> str:
    return (
        f"{uri} could not be read ({err}); not resuming from an older checkpoint while a newer "
        "one may be complete. The attempt fails and Ray Train retries it (run.max_failures); "
        "raise run.upload_retries / run.upload_backoff_s for a slow store"
    )


def _remote_step(fs: pafs.FileSystem, path: str, policy: RetryPolicy) -> int | None:
    """The step in a stored folder's manifest, or None when it has none (cut off) or it is
    unreadable. Cheap: the full check happens after download."""
    manifest = _read_manifest(fs, path, policy)
    return None if manifest is None else int(manifest["step"])


def fetch_complete(
    fs: pafs.FileSystem, path: str, workdir: str | Path, policy: RetryPolicy = READ_RETRIES
) -> Path:
    """Download a stored checkpoint folder into `workdir` and check it; returns the local
    folder. Transient errors are retried per `policy` (past it: CheckpointReadError), and a copy
    that does not match its manifest is downloaded once more before IncompleteCheckpointError
    (a body cut short without an error must not make the resume fall back)."""
    local = Path(workdir) / Path(path).name
    uri = storage_uri(fs, path)
    retrier = Retrier(policy, f"downloading {uri}")

    def download() -> None:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        pafs.copy_files(
            path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )

    for attempt in (1, 2):
        try:
            retrier.call(download)
        except RetriesExhaustedError as e:
            raise CheckpointReadError(_unreadable(uri, e)) from e
        try:
            check_complete(local)
            return local
        except IncompleteCheckpointError as e:
            if attempt == 2:
                raise
            log.warning("%s; downloading it once more", e)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class StoredConfig:
    path: str  # the checkpoint folder it was read from
    step: int
    config: dict[str, Any]  # pipeline.config.to_dict form


def stored_config(
    fs: pafs.FileSystem, run_path: str, policy: RetryPolicy = READ_RETRIES
) -> StoredConfig | None:
    """The config in the manifest of the run's newest checkpoint (by step) that records one;
    None when the run has no checkpoint, or only ones written before manifests held configs."""
    found = []
    for p in checkpoint_dirs(fs, run_path, policy):
        manifest = _read_manifest(fs, p, policy)
        if manifest is not None and isinstance(manifest.get("config"), dict):
            found.append((int(manifest["step"]), p, manifest["config"]))
    if not found:
        return None
    step, path, config = max(found, key=lambda t: (t[0], t[1]))
    return StoredConfig(path, step, config)


@dataclass(frozen=True)
class ChosenCheckpoint:
    path: str  # on the run's storage filesystem
    local: Path  # downloaded and checked copy
    step: int
    why: str


def choose_checkpoint(
    fs: pafs.FileSystem,
    run_path: str,
    offered: str | None,
    workdir: str | Path,
    policy: RetryPolicy = READ_RETRIES,
) -> ChosenCheckpoint | None:
    """The newest complete checkpoint of the run at `run_path`, downloaded into `workdir`.

    Candidates: every checkpoint folder in the run's storage plus `offered` (the one Ray Train
    hands the worker), newest step first, Ray's offer first among equals. A folder without a
    manifest, or whose files do not match it, is skipped with a warning. Reads are retried on
    transient errors per `policy`; a folder still unreadable after that raises
    CheckpointReadError instead of being skipped, so a flaky store never makes the run resume
    from an older checkpoint (whose later reports would have Ray prune the newer one). None when
    the run has no checkpoint at all; RuntimeError naming the run when Ray offered one but none
    is complete (starting from scratch would silently throw the run's progress away)."""
    paths = set(checkpoint_dirs(fs, run_path, policy)) | ({offered} if offered else set())
    ranked, skipped = [], []
    for p in paths:
        step = _remote_step(fs, p, policy)
        if step is None:
            skipped.append(f"{storage_uri(fs, p)}: no readable {MANIFEST_FILE} (upload cut off)")
        else:
            ranked.append((step, p == offered, p))
    for note in skipped:
        log.warning("not resuming from %s", note)
    for step, is_offered, p in sorted(ranked, reverse=True):
        try:
            local = fetch_complete(fs, p, workdir, policy)
        except CheckpointReadError:
            raise
        except (IncompleteCheckpointError, OSError) as e:
            log.warning("not resuming from %s: %s", storage_uri(fs, p), e)
            skipped.append(str(e))
            continue
        why = (
            "the latest checkpoint Ray Train registered"
            if is_offered
            else "the newest complete checkpoint in storage"
            + (f" (Ray offered {storage_uri(fs, offered)})" if offered else "")
        )
        log.warning("resuming from %s at step %d: %s", storage_uri(fs, p), step, why)
        return ChosenCheckpoint(p, local, step, why)
    if offered and _remote_step(fs, offered, policy) is None:
        legacy = _legacy_offered(fs, offered, workdir)
        if legacy is not None:
            return legacy
    if offered:
        raise RuntimeError(
            f"no complete checkpoint in {storage_uri(fs, run_path)} although Ray Train offered "
            f"{storage_uri(fs, offered)}: {'; '.join(skipped)}. Start a new run (a new "
            "run.run_name) or repair the run folder."
        )
    return None


def _legacy_offered(fs: pafs.FileSystem, path: str, workdir: str | Path) -> ChosenCheckpoint | None:
    """A checkpoint Ray registered before folders carried manifests: Ray registers a folder
    only after its upload returned, so it is complete if its file loads."""
    local = Path(workdir) / f"legacy-{Path(path).name}"
    try:
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        step = int(load_checkpoint(local / CHECKPOINT_FILE)["step"])
    except Exception as e:  # any failure to load means: not usable
        log.warning("not resuming from %s: %s", storage_uri(fs, path), e)
        return None
    why = "the checkpoint Ray Train registered (no manifest: written before manifests existed)"
    log.warning("resuming from %s at step %d: %s", storage_uri(fs, path), step, why)
    return ChosenCheckpoint(path, local, step, why)


def set_aside_unreadable_snapshot(fs: pafs.FileSystem, run_path: str) -> str | None:
    """A driver killed while Ray Train rewrote the run's checkpoint list leaves it truncated,
    and Ray then refuses to start the run. Move such a file aside (returns where to), so the
    run starts without Ray's list and resumes from the newest complete folder instead."""
    path = f"{run_path}/{RAY_SNAPSHOT_FILE}"
    try:
        with fs.open_input_stream(path) as f:
            json.loads(f.read())
        return None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.move(path, aside)
        log.warning(
            "Ray Train's checkpoint list %s was unreadable (%s), moved to %s; the run will "
            "resume from the newest complete checkpoint folder",
            storage_uri(fs, path), e, storage_uri(fs, aside),
        )  # fmt: skip
        return aside
