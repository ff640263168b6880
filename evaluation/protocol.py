"""The evaluation protocol: the same steps for every encoder and baseline, one long table.

For each encoder (the given ones, then the baselines "random_init" - the first encoder's
architecture at a fixed seed - and "raw_pixels"): frozen features per layer on train and test
(cached), a linear probe (C chosen on a split of train) and a kNN classifier on them; for every
generator, inpainting quality on the held-out (test) split. Writes table.parquet, table.csv,
probe_accuracy.png, confusion.png and inpaint_<encoder>.png into `out_dir`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evaluation import report
from evaluation.cache import CacheKey, Features
from evaluation.extraction import SplitSpec, split_features
from evaluation.features import (
    Encoder,
    check_image_size,
    check_layers,
    load_encoder,
    model_config_of,
    random_init_encoder,
    raw_pixels_encoder,
)
from evaluation.inpainting import evaluate_inpainting
from evaluation.knn import knn_classify
from evaluation.probe import ProbeSettings, fit_probe, predict, score_probe
from evaluation.streaming_probe import StreamingSettings, fit_streaming_probe, score_streaming_probe

log = logging.getLogger(__name__)

RANDOM_INIT, RAW_PIXELS, MEAN_FILL = "random_init", "raw_pixels", "mean_fill"
INPAINT_LAYER = "output"  # the table's layer for inpainting rows (the decoder's output)


@dataclass(frozen=True)
class ProtocolSettings:
    """Everything besides the encoders and the data that shapes the numbers."""

    batch_size: int = 256
    max_dim: int = 4096  # pooled feature size per layer
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    # "sklearn": lbfgs on the features in memory; "streaming": a torch linear head trained on
    # chunks streamed from the Parquet cache (evaluation.streaming_probe), for layers too big
    # for RAM (kNN still reads the features in memory).
    probe_kind: str = "sklearn"
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    knn_k: int = 20
    knn_temperature: float = 0.07
    inpaint_images: int = 2000  # held-out images scored for inpainting (0 = the whole split)
    baselines: tuple[str, ...] = (RANDOM_INIT, RAW_PIXELS)
    seed: int = 0  # random-init baseline weights

    def __post_init__(self) -> None:
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r}")


PROBE_KINDS = ("sklearn", "streaming")


def _probe(
    train: Features, test: Features, files: tuple[Path, Path], s: ProtocolSettings
) -> tuple[dict[str, float], np.ndarray]:
    """The linear probe of `s.probe_kind`: (metrics, test predictions). The streaming one reads
    the layer's cache files (train, test), not the arrays."""
    if s.probe_kind == "streaming":
        fit = fit_streaming_probe(files[0], s.streaming)
        return score_streaming_probe(fit, files[1], s.streaming.chunk_rows)
    fit = fit_probe(train.x, train.labels, s.probe)
    return score_probe(fit, test.x, test.labels), predict(fit, test.x)


def _layer_metrics(
    train: Features, test: Features, files: tuple[Path, Path], s: ProtocolSettings
) -> tuple[dict[str, float], np.ndarray]:
    """Probe + kNN on one layer: (metrics, test predictions of the probe)."""
    metrics, pred = _probe(train, test, files, s)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    metrics |= knn_classify(
        train.x,
        train.labels,
        test.x,
        test.labels,
        num_classes=num_classes,
        k=s.knn_k,
        temperature=s.knn_temperature,
    )
    metrics["feature_dim"] = float(train.x.shape[1])
    return metrics, pred


def _inpaint_batches(encoder: Encoder, urls: str, image_size: int, s: ProtocolSettings):
    """Held-out batches with the encoder's own mask config (train=False: deterministic masks)."""
    from pipeline.config import DataConfig
    from pipeline.data import build_loader
    from pipeline.passes import take_batches

    data = DataConfig(image_size=image_size, resize=encoder.config.data.resize,
                      batch_size=min(s.batch_size, 128), num_workers=0)  # fmt: skip
    loader = build_loader(data, encoder.config.mask, urls=urls, train=False, seed=s.seed)
    return take_batches(loader, n_images=s.inpaint_images or None)  # 0: the whole split


def _inpaint(encoder: Encoder, urls: str, image_size: int, s: ProtocolSettings, out_dir: Path):
    from pipeline.trainer import inpaint

    g, model_cfg = encoder.module, encoder.config.model
    g.eval()
    with torch.inference_mode():
        metrics, fill, grid = evaluate_inpainting(
            _inpaint_batches(encoder, urls, image_size, s),
            lambda b: inpaint(g, b, model_cfg),
            grid_scale=max(1, 128 // image_size),
        )
    grid.save(out_dir / f"inpaint_{encoder.name}.png")
    return metrics, fill


def load_all(
    encoders: dict[str, str | None],
    image_size: int,
    s: ProtocolSettings,
    download_dir: Path,
    tracking_uri: str | None,
) -> list[Encoder]:
    """The given encoders (loaded), then the baselines, all checked against `image_size`."""
    reserved = {*s.baselines, MEAN_FILL}
    if clash := sorted(reserved & set(encoders)):
        raise ValueError(f"encoder name(s) {clash} are reserved for baselines {sorted(reserved)}")
    loaded = []
    for name, uri in encoders.items():
        if uri is None:
            raise ValueError(f"encoder {name!r} has no checkpoint path or runs:/ URI")
        loaded.append(load_encoder(name, uri, download_dir, tracking_uri))
    if RANDOM_INIT in s.baselines:
        loaded.append(random_init_encoder(model_config_of(loaded, image_size), s.seed))
    if RAW_PIXELS in s.baselines:
        loaded.append(raw_pixels_encoder())
    for e in loaded:
        check_image_size(e, image_size)
    return loaded


def _class_names(urls: str) -> list[str] | None:
    """classes.json beside the first shard (as in the CIFAR-10 folder), if there is one."""
    from pipeline.data import expand_urls
    from pipeline.data.open import read_beside

    try:
        data = read_beside(expand_urls(urls)[0], "classes.json")
        names = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) else None


def evaluate_encoders(
    encoders: dict[str, str | None],
    *,
    train_urls: str,
    test_urls: str,
    layers: Sequence[str] | None,
    cache_dir: str | Path,
    out_dir: str | Path,
    image_size: int,
    settings: ProtocolSettings = ProtocolSettings(),
    tracking_uri: str | None = None,
    use_ray: bool = False,
    ray_tasks: int = 2,
) -> pd.DataFrame:
    """Run the protocol; returns the long table (encoder, layer, metric, value).

    `encoders`: name -> checkpoint path or MLflow runs:/ URI. `layers`: encoder layers to probe
    (None = all; raw pixels always use "pixels"). `use_ray` fans extraction out over Ray tasks
    (a Ray must be running or reachable). Nothing is selected on the test split.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_all(encoders, image_size, settings, cache_dir / "downloads", tracking_uri)
    # Baselines without a training resize of their own (raw pixels) see the images as the
    # first pretrained encoder does, so every row of the table reads the same pixels.
    default_resize = model_config_of(loaded, image_size).data.resize
    rows: list[dict] = []
    fills: dict[str, dict[str, float]] = {}  # mask kind -> mean-fill baseline metrics
    predictions: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for enc in loaded:
        chosen = check_layers(enc, layers)
        resize = enc.config.data.resize if enc.config is not None else default_resize
        spec = {
            name: SplitSpec(name, urls, image_size, settings.batch_size, settings.max_dim, resize)
            for name, urls in (("train", train_urls), ("test", test_urls))
        }
        feats = {
            split: split_features(enc, chosen, sp, cache_dir, use_ray=use_ray, ray_tasks=ray_tasks)
            for split, sp in spec.items()
        }
        for layer in chosen:
            files = tuple(
                CacheKey(enc.weights, spec[n].split_key(), spec[n].transform_key(), layer).path(
                    cache_dir
                )
                for n in ("train", "test")
            )
            metrics, pred = _layer_metrics(
                feats["train"][layer], feats["test"][layer], files, settings
            )
            rows += report.rows_for(enc.name, layer, metrics)
            predictions[enc.name, layer] = (feats["test"][layer].labels, pred)
            log.info("%s/%s: %s", enc.name, layer, metrics)
        if enc.can_inpaint:  # an encoder-only MLflow Model has no decoder
            metrics, fills[enc.config.mask.kind] = _inpaint(
                enc, test_urls, image_size, settings, out_dir
            )
            rows += report.rows_for(enc.name, INPAINT_LAYER, metrics)
    # The mean-colour fill (the masked input itself) is the floor every inpainter must beat;
    # masks are deterministic per key, so one row per mask kind.
    for kind, fill in fills.items():
        rows += report.rows_for(MEAN_FILL, f"{INPAINT_LAYER}:{kind}", fill)
    table = report.make_table(rows)
    _write_outputs(table, predictions, out_dir, _class_names(test_urls))
    return table


def _write_outputs(
    table: pd.DataFrame,
    predictions: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    out_dir: Path,
    class_names: list[str] | None,
) -> None:
    report.write_table(table, out_dir)
    if predictions:
        report.accuracy_bar_chart(table, out_dir / "probe_accuracy.png")
        best = report.best_layer(table)
        y_true, y_pred = predictions[best]
        title = f"Confusion matrix, best probe: {best[0]} / {best[1]}"
        report.confusion_matrix_plot(y_true, y_pred, class_names, out_dir / "confusion.png", title)
