"""The linear-probe benchmark: every encoder x protocol x label fraction x layer, resumable.

    res = run_benchmark(BenchmarkConfig(
        encoders=(EncoderSpec("dcgan_region_rec", "runs:/<id>/encoder", seed=0), ...),
        train_shards=..., test_shards=...))

For each encoder (the given ones, then `random_init` drawn with `random_init_seeds` seeds in
the first context encoder's architecture, then `raw_pixels`), each protocol (`PROTOCOLS`: how a
layer's map is pooled), each layer and each label fraction: a linear probe (`evaluation.probe`,
C chosen on validation rows of that label subset, the grid extended at an edge) scored on test
with a Wilson interval. Each result is a unit (`evaluation.units`) written as it finishes under
<output_root>/benchmark/<name>/units/: a rerun with the same name skips what is done. Features
are extracted once per (encoder, pooling) and cached (`evaluation.cache`), then reused by every
label fraction and C. The headline and the gaps are chosen on validation (`evaluation.selection`)
and written with the tables and plots by `evaluation.bench_report`; MLflow logging is
`evaluation.bench_tracking`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evaluation import cache
from evaluation.bench_config import PROTOCOLS, BenchmarkConfig, EncoderSpec
from evaluation.cache import CacheKey, Features
from evaluation.extraction import SplitSpec, extract_pooled
from evaluation.features import (
    Encoder,
    check_image_size,
    check_layers,
    load_encoder,
    pooled_side,
    random_init_encoder,
    raw_pixels_encoder,
)
from evaluation.selection import PIXELS, RANDOM
from evaluation.units import UnitKey, load_unit, run_unit, save_unit
from pipeline.config import Config, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """An encoder ready to extract from, with its identity in the table."""

    spec: EncoderSpec
    encoder: Encoder
    layers: tuple[str, ...]
    resize: int


def baseline_specs(cfg: BenchmarkConfig) -> list[EncoderSpec]:
    specs = [
        EncoderSpec(RANDOM, f"random_init:{s}", RANDOM, s) for s in range(cfg.random_init_seeds)
    ]
    if cfg.raw_pixels:
        specs.append(EncoderSpec(PIXELS, "pixels", PIXELS, 0))
    return specs


def load_encoders(cfg: BenchmarkConfig, download_dir: Path, tracking_uri: str) -> Iterator[Loaded]:
    """The given encoders, then the baselines, loaded one at a time (one in memory)."""
    first_config: Config | None = None
    for spec in (*cfg.encoders, *baseline_specs(cfg)):
        if spec.kind == RANDOM and spec.name == RANDOM:
            base = first_config or Config(model=ModelConfig(image_size=cfg.image_size))
            enc = random_init_encoder(base, spec.seed, name=RANDOM)
        elif spec.kind == PIXELS and spec.name == PIXELS:
            enc = raw_pixels_encoder()
        else:
            enc = load_encoder(spec.name, spec.uri, download_dir, tracking_uri)
        check_image_size(enc, cfg.image_size)
        if first_config is None and enc.config is not None:
            first_config = enc.config
        # Raw pixels see the images as the first pretrained encoder does (its training resize).
        source = enc.config or first_config
        resize = source.data.resize if source is not None else 0
        yield Loaded(spec, enc, check_layers(enc, cfg.layers or None), resize)


def layer_shapes(enc: Encoder, layers: tuple[str, ...], image_size: int) -> dict[str, tuple]:
    """(C, h, w) of each layer's map, from two blank images."""
    with torch.inference_mode():
        out = enc.module.encode(torch.zeros(2, 3, image_size, image_size), list(layers))
    return {name: tuple(out[name].shape[1:]) for name in layers}


def pooled(shape: tuple, max_dim: int) -> int:
    """The pooled grid side of a (C, h, w) map under `max_dim` (`features.pool`'s rule)."""
    if len(shape) == 1:
        return 1
    return pooled_side(shape[0], min(shape[1], shape[2]), max_dim)


def feature_dim(shape: tuple, max_dim: int) -> int:
    p = pooled(shape, max_dim)
    return shape[0] * p * p if len(shape) == 3 else int(np.prod(shape))


def _split(cfg: BenchmarkConfig, item: Loaded, split: str) -> SplitSpec:
    urls = cfg.train_shards if split == "train" else cfg.test_shards
    return SplitSpec(split, urls, cfg.image_size, cfg.batch_size, resize=item.resize)


def _cache_path(item: Loaded, spec: SplitSpec, max_dim: int, layer: str, cache_dir: Path) -> Path:
    spec = dataclasses.replace(spec, max_dim=max_dim)
    key = CacheKey(item.encoder.weights, spec.split_key(), spec.transform_key(), layer)
    return key.path(cache_dir)


def ensure_cached(
    item: Loaded,
    plan: dict[int, list[str]],
    spec: SplitSpec,
    cache_dir: Path,
    dims: dict[tuple[int, str], int],
    budget: int,
) -> None:
    """Every (pooling, layer) of `plan` in the feature cache: the missing ones extracted in as
    few passes over the split as `budget` (feature values held per row) allows, every pooling
    of a pass from the same encoder forward, and written."""
    missing = {
        d: [lay for lay in lays if not _cache_path(item, spec, d, lay, cache_dir).is_file()]
        for d, lays in plan.items()
    }
    for group in pack([(d, lay) for d, lays in missing.items() for lay in lays], dims, budget):
        wanted: dict[int, list[str]] = {}
        for d, lay in group:
            wanted.setdefault(d, []).append(lay)
        log.info("extracting %s %s: %s", item.encoder.name, spec.name, wanted)
        for d, feats in extract_pooled(item.encoder, wanted, spec).items():
            for layer, f in feats.items():
                cache.save(f, _cache_path(item, spec, d, layer, cache_dir))


def pack(pairs: list[tuple[int, str]], dims: dict[tuple[int, str], int], budget: int) -> list:
    """Group (pooling, layer) pairs into extraction passes of at most `budget` feature values a
    row (first-fit decreasing; a pair bigger than the budget gets a pass of its own)."""
    groups: list[list[tuple[int, str]]] = []
    room: list[int] = []
    for pair in sorted(pairs, key=lambda p: -dims[p]):
        i = next((i for i, r in enumerate(room) if dims[pair] <= r), None)
        if i is None:
            groups.append([pair])
            room.append(budget - dims[pair])
        else:
            groups[i].append(pair)
            room[i] -= dims[pair]
    return groups


def cached(item: Loaded, spec: SplitSpec, max_dim: int, layer: str, cache_dir: Path) -> Features:
    """One (pooling, layer) from the cache; extracted again if the file is damaged."""
    path = _cache_path(item, spec, max_dim, layer, cache_dir)
    feats = cache.load(path)
    if feats is None:
        feats = extract_pooled(item.encoder, {max_dim: [layer]}, spec)[max_dim][layer]
        cache.save(feats, path)
    return feats


def extraction_plan(
    protocols: tuple[str, ...],
    layers: tuple[str, ...],
    side: dict[tuple[str, str], int],
    pending: set[UnitKey],
) -> dict[int, list[str]]:
    """max_dim -> the layers to extract at it: each (layer, pooled side) with pending units
    once, at the first protocol that pools the layer to that side."""
    wanted = {(k.layer, k.side) for k in pending}
    plan: dict[int, list[str]] = {}
    for p in protocols:
        for layer in layers:
            if (layer, side[p, layer]) in wanted:
                wanted.discard((layer, side[p, layer]))
                plan.setdefault(PROTOCOLS[p], []).append(layer)
    return plan


def run_encoder(cfg: BenchmarkConfig, item: Loaded, units_dir: Path, cache_dir: Path) -> list[dict]:
    """Every unit of one encoder (done ones read back, the rest computed and saved); returns
    one table row per (protocol, layer, fraction)."""
    shapes = layer_shapes(item.encoder, item.layers, cfg.image_size)
    side = {
        (p, lay): pooled(shapes[lay], PROTOCOLS[p]) for p in cfg.protocols for lay in item.layers
    }
    keys = {
        (p, lay, f): UnitKey(item.spec.name, item.spec.seed, lay, side[p, lay], f)
        for p in cfg.protocols for lay in item.layers for f in cfg.fractions_of(p)
    }  # fmt: skip
    records = {k: r for k in set(keys.values()) if (r := load_unit(units_dir, k)) is not None}
    pending = {k for k in keys.values() if k not in records}
    plan = extraction_plan(cfg.protocols, item.layers, side, pending)
    specs = {split: _split(cfg, item, split) for split in ("train", "test")}
    dims = {(d, lay): feature_dim(shapes[lay], d) for d, lays in plan.items() for lay in lays}
    for spec in specs.values():
        ensure_cached(item, plan, spec, cache_dir, dims, cfg.extract_dims)
    for max_dim, layers in plan.items():
        for layer in layers:  # one layer's features in memory at a time
            train, test = (cached(item, specs[x], max_dim, layer, cache_dir) for x in specs)
            side_now = pooled(shapes[layer], max_dim)
            for k in sorted((k for k in pending if (k.layer, k.side) == (layer, side_now)),
                            key=lambda k: k.fraction):  # fmt: skip
                records[k] = _compute(cfg, item, k, train, test, units_dir)
            del train, test
    if not cfg.keep_features:  # every unit of the encoder is done: its features are spent
        for spec in specs.values():
            for d, lays in plan.items():
                for lay in lays:
                    _cache_path(item, spec, d, lay, cache_dir).unlink(missing_ok=True)
    return [row(item.spec, p, records[k]) | {"unit": k.stem()} for (p, _, _), k in keys.items()]


def _compute(
    cfg: BenchmarkConfig,
    item: Loaded,
    key: UnitKey,
    train: Features,
    test: Features,
    units_dir: Path,
) -> dict:
    t0 = time.perf_counter()
    record, correct = run_unit(key, train, test, cfg.probe, cfg.subset_seed)
    record |= {"kind": item.spec.kind, "source": item.spec.uri}
    save_unit(units_dir, key, record, correct)
    log.info("unit %s: val %.2f test %.2f (C %g%s, %s) in %.0f s", key.stem(), record["val_top1"],
             record["test_top1"], record["C"], ", AT EDGE" if record["C_at_edge"] else "",
             record["val_method"], time.perf_counter() - t0)  # fmt: skip
    return record


ROW_FIELDS = ("val_top1", "test_top1", "test_ci_low", "test_ci_high", "test_n", "C", "C_final",
              "C_at_edge", "converged", "feature_dim", "n_train", "n_val",
              "val_method", "fit_seconds")  # fmt: skip


def row(spec: EncoderSpec, protocol: str, record: dict) -> dict:
    ident = {
        "encoder": spec.name, "kind": spec.kind, "protocol": protocol,
        "label_fraction": record["fraction"], "seed": spec.seed, "layer": record["layer"],
    }  # fmt: skip
    return ident | {f: record[f] for f in ROW_FIELDS} | {"val_by_C": json.dumps(record["val_by_C"])}


def units_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def correctness_of(units_dir: Path):
    """row -> its per-image test correctness (None when the row has no unit, e.g. ingested)."""

    def correct(r: pd.Series) -> np.ndarray | None:
        unit = r.get("unit")
        if not isinstance(unit, str) or not unit:
            path = r.get("test_correct")
            return np.load(path).astype(np.float64) if isinstance(path, str) and path else None
        return np.load(units_dir / f"{unit}.npy").astype(np.float64)

    return correct
