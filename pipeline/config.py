"""Run configuration: frozen dataclasses, one per concern, nested in one root `Config`.

A run is fully described by its resolved `Config` (logged once) and its data. Configs come from
YAML plus dotted command-line overrides (`train.max_steps=200`); an unknown key or a value of
the wrong type is an error naming the key, never a silent default. Derived values (the centre
target size, the per-worker batch) are computed by functions, never written back.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.storage import OUTPUT_SCHEMES, is_uri, scheme

# A key of pipeline.data.masks.MASKS (the mask registry), checked by `validate`: not a Literal,
# so that a new mask kind is one registry entry.
MaskKind = str
Arch = Literal["dcgan", "alexnet"]
# "auto" = bf16 where the device computes it natively, fp32 elsewhere (pipeline.precision).
Precision = Literal["auto", "fp32", "bf16"]
# "webdataset": build_loader in each rank (exact epochs); "ray_data": decode on any CPU node of
# the cluster through Ray Data (pipeline.data.ray_data), see docs/input_paths.md.
InputPath = Literal["webdataset", "ray_data"]


class ConfigError(ValueError):
    """A config key is unknown, missing, or holds a value of the wrong type or range."""


@dataclass(frozen=True)
class DataConfig:
    train_shards: str = ""  # brace pattern, a YAML list, local paths, s3:// or gs:// URLs
    val_shards: str = ""  # held-out shards for reconstruction error and probes ("" = none)
    image_size: int = 128  # network input side (the paper: 128)
    resize: int = 0  # shorter side before the random crop; 0 = image_size (the paper: 350 for 128)
    batch_size: int = 64  # per worker (rank); the paper's 64 is per step on one GPU
    num_workers: int = 0  # DataLoader processes per rank; 0 decodes in the training process
    shuffle_buffer: int = 1000  # samples held for in-stream shuffling
    resampled: bool = False  # endless stream (shards drawn with replacement) vs exact epochs
    steps_per_epoch: int = 0  # required when resampled; 0 in epoch mode = derived from counts
    flip: bool = True  # random horizontal flip p = 0.5 on training crops
    # A shard read that fails with a transient error (dropped connection, timeout, HTTP 503) is
    # re-opened at the byte reached, up to read_retries times per shard with backoff
    # retry_backoff_s, 2x, 4x, ...; then the shard's remaining samples are counted as skipped.
    read_retries: int = 3
    retry_backoff_s: float = 0.5
    # Shards are untrusted: a tar member over this many bytes, like a header with a negative,
    # unparsable or past-the-end size or a bad checksum, ends the shard's reading there (the rest
    # counted as skipped) instead of being read into memory. 64 MiB: far above any image.
    max_member_bytes: int = 64 << 20
    input: InputPath = "webdataset"  # training input path (see InputPath)


@dataclass(frozen=True)
class MaskConfig:
    kind: MaskKind = "center"
    overlap: int = 4  # centre mask: visible ring of the target kept (px at 128; scaled below)
    min_cover: float = 0.20  # random masks: accepted share of dropped pixels
    max_cover: float = 0.30
    max_blocks: int = 5  # random_block: up to this many overlapping rectangles
    # Mean fill colour (R, G, B of 255) of the released code, mapped to [-1, 1] at use.
    fill_rgb: tuple[int, int, int] = (117, 104, 123)


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "dcgan"
    image_size: int = 128  # must equal data.image_size
    width: int = 64  # channels of the first conv; doubles per stage up to 8x
    bottleneck: int = 4000  # channels of the 1x1 code (paper: 4000)
    # Random masks need the whole image back; the centre mask predicts only the centre square.
    full_image_output: bool = False


@dataclass(frozen=True)
class LossConfig:
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001  # 0 builds and runs no discriminator at all
    overlap_weight: float = 10.0  # centre mask: L2 weight of the visible ring vs the interior
    visible_weight: float = 0.0  # random masks: L2 weight of visible pixels (0 = ignored)
    # Full-image output (random masks): what D judges as fake. "pasted" = the prediction inside
    # the hole on the real context (this project's default); "prediction" = G's raw output, as
    # the released train_random.lua (pair it with visible_weight=1: its whole-image L2). The
    # centre mask always hands D the predicted square. See docs/method.md.
    discriminator_input: Literal["pasted", "prediction"] = "pasted"


@dataclass(frozen=True)
class TrainConfig:
    lr_d: float = 2e-4  # the base rate (the released `lr`); G's too when there is no D
    # 0 = derived (see generator_lr): 10x lr_d with the adversarial loss on, as released; lr_d
    # with reconstruction only. Any value > 0 is used as given.
    lr_g: float = 0.0
    beta1: float = 0.5
    beta2: float = 0.999
    max_steps: int = 1000  # total optimiser steps (both G and D) over all epochs
    # "bf16" autocasts matmuls/convs on CPU and CUDA; "auto" picks bf16 only where it is native
    # (pipeline.precision), since emulated bf16 runs ~30x slower than fp32.
    precision: Precision = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # auto: see pipeline.precision.resolve
    compile: bool = False
    sync_bn: bool = True  # SyncBatchNorm under DDP so BN statistics do not drift per rank
    log_every: int = 10
    checkpoint_every: int = 200  # steps between checkpoints (and ray.train.report calls)
    sample_every: int = 200  # steps between inpainting sample grids
    eval_batches: int = 4  # held-out batches (data.val_shards) scored at each checkpoint
    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    name: str = "context-encoder"  # MLflow experiment name
    # Ray Train run name; "" = <name>-<timestamp>. Running again with the same run_name
    # resumes that run from its last checkpoint (and continues its MLflow run).
    run_name: str = ""
    # Every file a job writes lands under this directory, or this s3:// / gs:// URI (checkpoints
    # go there through Ray Train; see docs/object_storage.md).
    output_root: str = "outputs"
    # "" = sqlite:///<output_root>/mlflow.db; required when output_root is a URI.
    tracking_uri: str = ""
    address: str = ""  # Ray address; "" = RAY_ADDRESS or a new local Ray
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2  # worker deaths tolerated; the run restarts from its last checkpoint
    num_to_keep: int = 2  # checkpoints kept in storage
    # The final encoder is always logged as an MLflow Model (`encoder_model`); a name here also
    # registers it as a new version of that registered model. "" = not registered.
    register_model: str = ""
    # A checkpoint upload that fails with a transient error is retried this many times (backoff
    # upload_backoff_s, 2x, ...); then the run fails with an error naming the storage path.
    upload_retries: int = 3
    upload_backoff_s: float = 1.0
    # End of a run: how long rank 0 waits to send what it still queues for MLflow (a tracking
    # server outage); the rest stays in <output_root>/tracking_spool, sent on resume.
    tracking_flush_timeout_s: float = 60.0
    system_metrics_every_s: float = 10.0  # rank 0 logs system/* metrics this often; 0 = off
    # Resuming a run_name whose checkpoints were written with another config is refused (exit 2,
    # naming the keys) unless this is true; the changes are then tagged on the MLflow run
    # (config_change.<key>). Keys that never change what is trained are always allowed:
    # pipeline.identity.SAFE_TO_CHANGE.
    allow_config_change: bool = False
    # While Ray Train cannot place its workers (a node lost and not replaced, a cluster too
    # small) the driver prints what it waits for, and after this many seconds stops the run
    # with an error (checkpoints kept, resumable). 0 = wait forever, as Ray Train itself does.
    worker_wait_timeout_s: float = 600.0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---- derived values -------------------------------------------------------------------------


def target_size(model: ModelConfig) -> int:
    """Side of the predicted square: the centre half (64 of 128) or the whole image."""
    return model.image_size if model.full_image_output else model.image_size // 2


def scaled_overlap(mask: MaskConfig, image_size: int) -> int:
    """The visible ring scales with the image: 4 px at 128, 1 px at 32."""
    return max(1, round(mask.overlap * image_size / 128)) if mask.overlap > 0 else 0


def generator_lr(train: TrainConfig, loss: LossConfig) -> float:
    """G's Adam learning rate. The released code raises it to 10x the base rate only for the
    joint loss (the generator must keep up with a discriminator); reconstruction alone trains
    at the base rate."""
    if train.lr_g > 0:
        return train.lr_g
    return train.lr_d * (10.0 if loss.lambda_adv > 0 else 1.0)


def global_batch(cfg: Config) -> int:
    """Images per optimiser step over all ranks: data.batch_size is per rank, and no learning
    rate is rescaled with it (the paper's 64 is the global batch of one GPU)."""
    return cfg.data.batch_size * max(1, cfg.run.num_workers)


def tracking_uri(run: RunConfig) -> str:
    """The MLflow tracking URI: run.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite under
    run.output_root (pipeline.tracking.server); workers change directory, so it is always
    absolute. Raises ConfigError when none is set and run.output_root is an object-storage URI."""
    from pipeline.tracking.server import resolve_tracking_uri  # it imports this module's types

    try:
        return resolve_tracking_uri(run)[0]
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ---- validation -----------------------------------------------------------------------------

# A run name is a folder of run storage and a quoted value in an MLflow filter string.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def relative_sqlite_path(uri: str) -> str | None:
    """The path of a `sqlite:///relative/path` URI (three slashes, then no fourth), else None
    (sqlite:////abs/path, another scheme, or no URI)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :]
    return rest if rest and not rest.startswith("/") else None


def _env_tracking_uri() -> str:
    from pipeline.tracking.server import env_tracking_uri

    return env_tracking_uri()


def validate(cfg: Config) -> Config:
    """Check ranges and cross-field rules; returns `cfg` so calls chain."""
    # Imported here: pipeline.data imports this module.
    from pipeline.data.masks import MASKS, needs_full_image_output

    rel_sqlite = relative_sqlite_path(cfg.run.tracking_uri)
    checks = [
        (
            cfg.model.image_size == cfg.data.image_size,
            "model.image_size must equal data.image_size",
        ),
        (
            cfg.data.image_size >= 32 and cfg.data.image_size % 32 == 0,
            "data.image_size must be a multiple of 32 (>= 32)",
        ),
        (
            cfg.data.resize == 0 or cfg.data.resize >= cfg.data.image_size,
            "data.resize must be 0 or >= data.image_size",
        ),
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0 <= cfg.data.read_retries <= 10, "data.read_retries must be in 0..10"),
        (cfg.data.retry_backoff_s >= 0, "data.retry_backoff_s must be >= 0"),
        (cfg.data.max_member_bytes > 0, "data.max_member_bytes must be > 0"),
        (0 <= cfg.run.upload_retries <= 10, "run.upload_retries must be in 0..10"),
        (cfg.run.upload_backoff_s >= 0, "run.upload_backoff_s must be >= 0"),
        (
            not cfg.data.resampled or cfg.data.steps_per_epoch > 0,
            "data.steps_per_epoch must be > 0 when data.resampled is true",
        ),
        (
            cfg.data.input != "ray_data" or not cfg.data.resampled,
            "data.input=ray_data reads exact epochs: set data.resampled=false",
        ),
        (
            0 < cfg.mask.min_cover <= cfg.mask.max_cover < 1,
            "mask cover must satisfy 0 < min_cover <= max_cover < 1",
        ),
        (
            cfg.mask.kind in MASKS,
            f"mask.kind: {cfg.mask.kind!r} is not one of {list(MASKS)}",
        ),
        (
            not needs_full_image_output(cfg.mask.kind) or cfg.model.full_image_output,
            f"mask.kind={cfg.mask.kind} needs model.full_image_output=true",
        ),
        (cfg.loss.lambda_rec >= 0 and cfg.loss.lambda_adv >= 0, "loss weights must be >= 0"),
        (cfg.loss.lambda_rec + cfg.loss.lambda_adv > 0, "at least one loss weight must be > 0"),
        (cfg.train.lr_d > 0, "train.lr_d must be > 0"),
        (cfg.train.lr_g >= 0, "train.lr_g must be >= 0 (0 = derived from lr_d)"),
        (cfg.train.max_steps > 0, "train.max_steps must be > 0"),
        # A modulus: 0 divides by zero at the first step, inside the workers.
        (cfg.train.log_every > 0, "train.log_every must be > 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        (cfg.train.sample_every > 0, "train.sample_every must be > 0"),
        (cfg.train.eval_batches >= 0, "train.eval_batches must be >= 0"),
        (cfg.run.num_workers >= 0, "run.num_workers must be >= 0"),
        (cfg.run.cpus_per_worker > 0, "run.cpus_per_worker must be > 0"),
        # Ray Train's CheckpointConfig refuses 0 only once the run is open (left RUNNING).
        (cfg.run.num_to_keep >= 1, "run.num_to_keep must be >= 1"),
        (cfg.run.max_failures >= -1, "run.max_failures must be >= -1 (-1 = retry forever)"),
        (
            not cfg.run.run_name or RUN_NAME.fullmatch(cfg.run.run_name) is not None,
            f"run.run_name: {cfg.run.run_name!r} may hold only letters, digits, '.', '_' and "
            "'-' (at most 128, not starting with '.' or '-'): it names a storage folder and "
            "goes into an MLflow search filter",
        ),
        (
            rel_sqlite is None,
            f"run.tracking_uri: {cfg.run.tracking_uri!r} is a relative sqlite path, which each "
            "process (Ray workers change directory) would resolve to another file; write it "
            f"absolute: sqlite:///{Path(rel_sqlite or '.').resolve()}",
        ),
        (cfg.run.tracking_flush_timeout_s >= 0, "run.tracking_flush_timeout_s must be >= 0"),
        (cfg.run.system_metrics_every_s >= 0, "run.system_metrics_every_s must be >= 0"),
        (cfg.run.worker_wait_timeout_s >= 0, "run.worker_wait_timeout_s must be >= 0"),
        (all(0 <= c <= 255 for c in cfg.mask.fill_rgb), "mask.fill_rgb values must be in 0..255"),
        (
            not is_uri(cfg.run.output_root) or scheme(cfg.run.output_root) in OUTPUT_SCHEMES,
            f"run.output_root: {cfg.run.output_root!r} is neither a local path nor one of "
            f"{', '.join(s + '://' for s in OUTPUT_SCHEMES)}",
        ),
        (
            not is_uri(cfg.run.output_root) or bool(cfg.run.tracking_uri or _env_tracking_uri()),
            "run.tracking_uri must be set (or MLFLOW_TRACKING_URI) when run.output_root is an "
            "object-storage URI (the default sqlite store cannot live in a bucket; see "
            "docs/object_storage.md)",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
    return cfg


# ---- loading --------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`. No silent conversions
    beyond int -> float and list -> tuple."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin in (dict, list):
        if not isinstance(value, origin):
            raise ConfigError(f"{key}: expected a {origin.__name__}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        # A list of shard URLs is kept as one comma-separated string (see pipeline.data).
        return ",".join(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(d: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain dict, rejecting unknown keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key(s) {unknown} at {where}; known: {sorted(names)}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The inverse of `from_dict`: plain dicts, lists for tuples (YAML- and JSON-safe)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = (
            to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
        )
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and Tune search spaces use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (None when empty). Raises ConfigError in one line naming
    file:line:column for a missing, unreadable or malformed file, never a parser traceback."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}:{_yaml_where(e)}invalid YAML: {_yaml_problem(e)}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{p}: cannot read the config: {e}") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else " "


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's own words (e.g. "expected ',' or ']', but got '<stream end>'"), one line."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    text = ", ".join(p for p in parts if p) or str(e)
    start, end = getattr(e, "context_mark", None), getattr(e, "problem_mark", None)
    if start is not None and end is not None and start.line != end.line:
        text += f" (the construct opened at line {start.line + 1}, column {start.column + 1})"
    return " ".join(text.split())


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict copy."""
    out = yaml.safe_load(yaml.safe_dump(d)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""  # `key=` sets ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: invalid YAML value: {_yaml_problem(e)}"
            ) from None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when `path` is None), apply overrides, validate."""
    d: dict[str, Any] = {}
    if path is not None:
        d = read_yaml(path) or {}
    d = apply_overrides(d, overrides or [])
    return validate(from_dict(d))


def dump_config(cfg: Config) -> str:
    """YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
