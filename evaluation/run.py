"""The probe job's body as one library call: frozen-feature probes, kNN and inpainting for any
number of encoders and the baselines (`evaluation.protocol`), logged as one MLflow run.

    res = run_probe(ProbeRunConfig(encoders={"ce": "runs:/<id>/encoder/generator.pt"},
                                   train_shards=..., test_shards=...))
    print(res.summary())

`jobs.probe` builds the config from its flags, `jobs.end_to_end` directly; either way one run:
the params, one metric per (metric, encoder, layer), and every file the protocol wrote.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from evaluation import report
from evaluation.probe import ProbeSettings, c_grid_from
from evaluation.protocol import ProtocolSettings, evaluate_encoders
from evaluation.streaming_probe import StreamingSettings
from pipeline.storage import default_sqlite_uri, local_root
from pipeline.tracking import RunLogger, new_run, tracked_run
from pipeline.tracking.server import check_tracking_uri, env_tracking_uri

# The config fields logged as params, beside one `encoder.<name>` per encoder.
LOGGED = ("train_shards", "test_shards", "layers", "image_size", "max_dim", "c_grid",
          "sweep_max_samples", "max_iter", "tol", "ray", "probe")  # fmt: skip


@dataclass(frozen=True)
class ProbeRunConfig:
    """One probe run. The defaults are `jobs.probe`'s flag defaults (its parser reads them)."""

    encoders: dict[str, str]  # name -> checkpoint path or runs:/<id>/encoder[/generator.pt]
    train_shards: str
    test_shards: str
    layers: str = ""  # comma-separated encoder layers ('' = all)
    image_size: int = 32
    # A local folder, or an s3:// gs:// URI: then the feature cache and report files stay in a
    # local mirror (pipeline.storage.local_root) and tracking_uri must be set.
    output_root: str = "outputs"
    tracking_uri: str = ""  # '' = sqlite:///<output_root>/mlflow.db (local output_root only)
    experiment: str = "context-encoder-probe"
    ray: bool = False  # fan feature extraction out over Ray
    ray_tasks: int = 2
    batch_size: int = 256
    max_dim: int = 4096  # pooled feature size per layer
    c_grid: str = ",".join(map(str, ProbeSettings.c_grid))  # probe Cs, comma-separated
    sweep_max_samples: int = ProbeSettings.sweep_max_samples
    max_iter: int = ProbeSettings.max_iter
    tol: float = ProbeSettings.tol
    inpaint_images: int = 2000
    # "sklearn" (features in memory) or "streaming" (a torch head on chunks of the Parquet
    # cache, for layers too big for RAM: evaluation/streaming_probe.py)
    probe: str = "sklearn"


@dataclass(frozen=True)
class ProbeRunResult:
    run_id: str
    tracking_uri: str
    out_dir: Path
    table: pd.DataFrame  # the protocol's long table (encoder, layer, metric, value)

    def summary(self) -> str:
        """The results table and where the run and its files are."""
        where = f"MLflow run {self.run_id} in {self.tracking_uri}; outputs in {self.out_dir}"
        return f"{report.format_table(self.table)}\n{where}"


# Encoder sources checked at load, not on the local disk.
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://")


def check_named_inputs(shards: dict[str, str], encoders: dict[str, str]) -> None:
    """Before any work: every shard pattern (flag -> pattern) expands, and every encoder that
    is a local path (name -> path or URI) exists. Errors name the flag or the encoder."""
    from pipeline.data import expand_urls

    for flag, urls in shards.items():
        try:
            expand_urls(urls)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{flag}: {err}") from err
    for name, uri in encoders.items():
        if not uri.startswith(URI_SCHEMES) and not Path(uri).expanduser().exists():
            raise FileNotFoundError(f"--encoder {name}={uri}: no such checkpoint file or folder")


def check_inputs(cfg: ProbeRunConfig) -> None:
    """The probe job's inputs (`check_named_inputs`) and its sizes."""
    check_named_inputs(
        {"--train-shards": cfg.train_shards, "--test-shards": cfg.test_shards}, cfg.encoders
    )
    if cfg.batch_size < 1 or cfg.max_dim < 1 or cfg.image_size < 1:
        raise ValueError("--batch-size, --max-dim and --image-size must be >= 1")


def protocol_settings(cfg: ProbeRunConfig) -> ProtocolSettings:
    grid = c_grid_from([float(v) for v in cfg.c_grid.split(",") if v.strip()])
    return ProtocolSettings(
        batch_size=cfg.batch_size,
        max_dim=cfg.max_dim,
        probe=ProbeSettings(
            c_grid=grid,
            sweep_max_samples=cfg.sweep_max_samples,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
        ),
        inpaint_images=cfg.inpaint_images,
        probe_kind=cfg.probe,
        streaming=StreamingSettings(c_grid=grid),
    )


def run_probe(cfg: ProbeRunConfig) -> ProbeRunResult:
    """Check the tracking store, (join Ray), run the protocol, log it to a new MLflow run in
    `cfg.experiment`; outputs under <output_root>/probe/<stamp>/ (local: for a URI root, its
    local mirror). The run ends FINISHED, or FAILED / KILLED with the exception re-raised
    (`tracked_run`)."""
    # Parquet caches and report files are read back by path: they stay on local disk, and the
    # report files reach object storage as MLflow artifacts.
    root = local_root(cfg.output_root)
    # The precedence of pretraining: the setting, $MLFLOW_TRACKING_URI, sqlite under the root.
    uri = cfg.tracking_uri or env_tracking_uri()
    uri = uri or default_sqlite_uri(cfg.output_root, "tracking_uri")
    check_tracking_uri(uri, cfg.experiment)  # fail before minutes of extraction, not after
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = root / "probe" / stamp
    if cfg.ray:
        from pipeline.runtime import connect_ray

        connect_ray()  # joins RAY_ADDRESS when set, else starts a local Ray
    settings = protocol_settings(cfg)
    run_id = new_run(uri, cfg.experiment, f"probe-{stamp}")
    with tracked_run(uri, run_id):
        table = evaluate_encoders(
            cfg.encoders,
            train_urls=cfg.train_shards,
            test_urls=cfg.test_shards,
            layers=[s for s in cfg.layers.split(",") if s] or None,
            cache_dir=root / "feature_cache",
            out_dir=out_dir,
            image_size=cfg.image_size,
            settings=settings,
            tracking_uri=uri,
            use_ray=cfg.ray,
            ray_tasks=cfg.ray_tasks,
        )
        params = {f"encoder.{n}": u for n, u in cfg.encoders.items()}
        params |= {k: getattr(cfg, k) for k in LOGGED}
        log_results(RunLogger(uri, run_id), table, out_dir, params)
    return ProbeRunResult(run_id, uri, out_dir, table)


def _metric_name(*parts: str) -> str:
    # MLflow metric names take letters, digits and _ - . / space only; keep them readable.
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def log_results(
    logger: RunLogger, table: pd.DataFrame, out_dir: Path, params: dict[str, object]
) -> None:
    """Params, one metric per (metric, encoder, layer), and every file the protocol wrote."""
    logger.params(params)
    metrics = {
        _metric_name(r.metric, r.encoder, r.layer): r.value for r in table.itertuples(index=False)
    }
    logger.metrics(metrics, step=0)
    for path in sorted(out_dir.iterdir()):
        if path.is_file():
            logger.file(path, "evaluation")
