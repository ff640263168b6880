"""Run identity: a run name stands for one config. Resuming it with another is refused, unless
the change is one that cannot alter what is trained, or the user says so explicitly.

Every checkpoint manifest stores the run's resolved config and its `fingerprint` (a sha256 over
the keys that define the run: everything but `SAFE_TO_CHANGE`). Before a run with an existing
checkpoint starts again, `check_resume(stored, new)` compares them:

    keys in SAFE_TO_CHANGE      always allowed (and tagged on the MLflow run)
    model.*, a discriminator    never: the stored weights do not fit another architecture
      switched on or off
    anything else               ConfigError naming the keys (exit 2), unless
                                run.allow_config_change=true; then tagged on the MLflow run as
                                config_change.<key> = "old -> new" (MLflow params keep the
                                values the run started with: they are immutable)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import Config, ConfigError, flatten, to_dict

# Keys whose change cannot alter the sequence of weights a run computes, so resuming with a new
# value is the same run: how long it goes on, how often it reports, where it reports to, and
# how patiently it handles faults. Everything else (data, masks, losses, optimiser, precision,
# the number of ranks and of loader workers, which together fix each batch) is the run itself.
SAFE_TO_CHANGE: dict[str, str] = {
    "train.max_steps": "extending (or shortening) a run is what resuming is for",
    "train.log_every": "logging only reads the losses",
    "train.checkpoint_every": "a checkpoint saves state; resume continues bit-exactly from any",
    "train.sample_every": "sample grids are drawn in eval mode from fixed held-out batches",
    "run.address": "which Ray cluster runs the workers",
    "run.output_root": "the run's folder moved (its checkpoints were found at the new place)",
    "run.tracking_uri": "where metrics go (a moved server); the store lacking the run starts "
    "a new MLflow run with the current params",
    "run.cpus_per_worker": "threads per rank; the same batches in the same order",
    "run.max_failures": "how many worker deaths to tolerate",
    "run.num_to_keep": "how many checkpoints storage keeps",
    "run.register_model": "the registered-model name the final encoder goes to",
    "run.upload_retries": "fault handling of checkpoint uploads",
    "run.upload_backoff_s": "fault handling of checkpoint uploads",
    "run.tracking_flush_timeout_s": "how long the end of a run waits for MLflow",
    "run.system_metrics_every_s": "system metrics sampling",
    "run.allow_config_change": "this switch itself",
    "run.worker_wait_timeout_s": "how long the driver waits for workers that cannot be placed",
    "data.read_retries": "fault handling of shard reads",
    "data.retry_backoff_s": "fault handling of shard reads",
}
# Changes no override allows: the stored weights would not load into the new networks.
_ARCHITECTURE_PREFIX = "model."
TAG_PREFIX = "config_change."
_TAG_MAX = 5000  # MLflow tag values hold 8000 characters; a long shard list is cut


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 (hex) of the keys that define the run (all but SAFE_TO_CHANGE) of a
    `pipeline.config.to_dict` config."""
    defining = {k: v for k, v in flatten(config).items() if k not in SAFE_TO_CHANGE}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key that differs. A key the stored config
    lacks (written before the key existed) counts only when the new value is not its default,
    so adding a config key does not block resuming every older run; a key that no longer
    exists is ignored."""
    a, b = flatten(old), flatten(new)
    defaults = flatten(to_dict(Config()))
    changes = {}
    for k in sorted(b):
        before = a[k] if k in a else defaults.get(k)
        if before != b[k]:
            changes[k] = (a.get(k), b[k])
    return changes


def _adversarial(config: dict[str, Any]) -> bool:
    return float(config.get("loss", {}).get("lambda_adv", 0.0)) > 0


def check_resume(
    stored: dict[str, Any], new: dict[str, Any], *, run_name: str, step: int
) -> dict[str, tuple[Any, Any]]:
    """The changes resuming run `run_name` (stored config from its checkpoint at `step`) with
    `new` makes; raises ConfigError naming the keys when they are not allowed (see the module
    docstring). Returns every change, safe ones included, for the MLflow tags."""
    changes = config_changes(stored, new)
    where = f"run.run_name={run_name!r} has a checkpoint at step {step} with another config"
    fixed = [k for k in changes if k.startswith(_ARCHITECTURE_PREFIX)]
    if _adversarial(stored) != _adversarial(new):
        fixed.append("loss.lambda_adv (a discriminator on/off)")
    if fixed:
        raise ConfigError(
            f"{where}: {_describe(changes, fixed)} cannot change on resume (the stored weights "
            "do not fit); choose a new run.run_name"
        )
    unsafe = [k for k in changes if k not in SAFE_TO_CHANGE]
    if unsafe and not new.get("run", {}).get("allow_config_change", False):
        raise ConfigError(
            f"{where}: {_describe(changes, unsafe)}; resume with the stored values, choose a new "
            "run.run_name, or set run.allow_config_change=true to continue with the new ones"
        )
    return changes


def _describe(changes: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    parts = []
    for k in keys:
        old, new = changes.get(k.split(" ")[0], (None, None))
        parts.append(f"{k} ({_short(old)} -> {_short(new)})" if k in changes else k)
    return ", ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def change_tags(changes: dict[str, tuple[Any, Any]]) -> dict[str, str]:
    """{config_change.<key>: "old -> new"}: what the resumed run really uses, on the MLflow run
    whose params still show the values it started with."""
    return {
        f"{TAG_PREFIX}{k}": f"{_short(old, _TAG_MAX)} -> {_short(new, _TAG_MAX)}"
        for k, (old, new) in changes.items()
    }


def resume_changes(cfg: Config, run_name: str, storage: str) -> dict[str, tuple[Any, Any]]:
    """Check `cfg` against the config stored with run `run_name`'s newest checkpoint under
    `storage` (Ray Train's storage path: local or s3:// gs://) before the run starts again;
    {} for a new run. Raises ConfigError as `check_resume` does; manifest reads are retried
    (run.upload_retries / run.upload_backoff_s)."""
    import pyarrow.fs as pafs

    from pipeline.checkpoint import stored_config
    from pipeline.retry import RetryPolicy

    fs, root = pafs.FileSystem.from_uri(storage)
    policy = RetryPolicy(retries=cfg.run.upload_retries, backoff_s=cfg.run.upload_backoff_s)
    stored = stored_config(fs, f"{root.rstrip('/')}/{run_name}", policy)
    if stored is None:
        return {}
    return check_resume(stored.config, to_dict(cfg), run_name=run_name, step=stored.step)
