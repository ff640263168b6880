"""The benchmark's configuration: encoders, protocols, label fractions, the probe settings, and
building it from the command line's flags (`config_from_flags`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.probe import ProbeSettings
from evaluation.run import check_named_inputs
from evaluation.selection import CONTEXT, PIXELS, RANDOM

# Protocol -> pooled values per layer. `gap`: the probe job's pooling, each map average-pooled
# to the largest p x p grid with C*p*p <= 4096 (global for C >= 1024). `spatial`: the
# literature's (Zhang et al. 2016, 2017: each conv map average-pooled to about 9,000 values);
# 9216 = 96^2 is that budget, e.g. a 64-channel map -> 12 x 12 (9,216), 128 -> 8 x 8 (8,192).
PROTOCOLS: dict[str, int] = {"gap": 4096, "spatial": 9216}
BASELINE_NAMES = (RANDOM, PIXELS)


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder to benchmark: a variant name (shared by its seeds), where its weights are,
    its kind and seed (rows of the same name and kind with different seeds are averaged)."""

    name: str
    uri: str
    kind: str = CONTEXT
    seed: int = 0


def parse_encoder(text: str) -> EncoderSpec:
    """NAME=URI[,kind=KIND][,seed=N] -> EncoderSpec; ValueError naming what is wrong."""
    head, *opts = text.split(",")
    name, sep, uri = head.partition("=")
    if not sep or not name or not uri:
        raise ValueError(f"--encoder {text!r}: expected NAME=PATH_OR_URI[,kind=K][,seed=N]")
    extra: dict[str, str] = {}
    for opt in opts:
        k, sep, v = opt.partition("=")
        if not sep or k not in ("kind", "seed") or not v:
            raise ValueError(f"--encoder {text!r}: unknown option {opt!r} (kind=..., seed=N)")
        extra[k] = v
    try:
        seed = int(extra.get("seed", 0))
    except ValueError as err:
        raise ValueError(f"--encoder {text!r}: seed must be an integer") from err
    return EncoderSpec(name, uri, extra.get("kind", CONTEXT), seed)


@dataclass(frozen=True)
class BenchmarkConfig:
    """One benchmark. A rerun with the same output_root and name resumes it."""

    encoders: tuple[EncoderSpec, ...]
    train_shards: str
    test_shards: str
    name: str = "cifar10"  # <output_root>/benchmark/<name>/, and the results files' prefix
    image_size: int = 32
    layers: tuple[str, ...] = ()  # () = every layer of the encoder
    protocols: tuple[str, ...] = ("gap", "spatial")
    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    # Protocol -> its own label fractions, where it should not run them all: e.g. `spatial` at
    # 1 % and 10 % only, its full-label 9,216-d fits being hours of CPU (docs/benchmark.md).
    protocol_fractions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    subset_seed: int = 0  # the stratified label subsets (the same for every encoder)
    random_init_seeds: int = 3  # as many as the headline variant's pretraining seeds
    # A headline (encoder, layer) comes from an encoder with this many seeds, where its kind
    # has one: the headline's interval must hold seed variation (evaluation/selection.py).
    headline_min_seeds: int = 3
    raw_pixels: bool = True
    probe: ProbeSettings = field(default_factory=lambda: BENCHMARK_PROBE)
    batch_size: int = 256
    # Feature values per row one extraction pass holds (all poolings and layers of the pass):
    # 16,384 is ~3.3 GB at CIFAR-10's 50,000 train rows, two passes for a width-64 DCGAN's four
    # layers under both protocols; 32,768 makes it one pass (~6 GB, + ~2 GB while sorting).
    extract_dims: int = 16384
    # Keep an encoder's cached features once all its units are done. Off by default: a
    # width-64 DCGAN's four layers under both protocols are ~7 GB a CIFAR-10 encoder, and the
    # units hold every result (a resume of a half-done encoder extracts its features again).
    keep_features: bool = False
    n_boot: int = 2000  # bootstrap resamples for the headline and gap intervals
    output_root: str = "outputs"
    tracking_uri: str = ""  # '' = sqlite:///<output_root>/mlflow.db
    experiment: str = "context-encoder-benchmark"
    results_dir: str = ""  # also write <name>.csv, summary and plot here (benchmarks/results)
    finetune_results: str = ""  # a table of fine-tune results to add (evaluation.bench_report)

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be among {list(PROTOCOLS)}, got {self.protocols}")
        for what, fr in [("", self.fractions)] + [
            (f" of {p}", f) for p, f in self.protocol_fractions.items()
        ]:
            if not fr or any(not 0 < f <= 1 for f in fr):
                raise ValueError(f"label fractions{what} must be in (0, 1], got {fr}")
        if stray := sorted(set(self.protocol_fractions) - set(self.protocols)):
            raise ValueError(f"fractions given for {stray}, not among the protocols run "
                             f"{list(self.protocols)}")  # fmt: skip
        ids = [(e.name, e.seed) for e in self.encoders]
        if len(set(ids)) != len(ids):
            raise ValueError(f"encoder (name, seed) pairs must be unique, got {ids}")
        if clash := sorted({e.name for e in self.encoders} & set(BASELINE_NAMES)):
            raise ValueError(f"encoder name(s) {clash} are reserved for the baselines")
        if self.random_init_seeds < 0:
            raise ValueError("random_init_seeds must be >= 0")
        if self.headline_min_seeds < 1:
            raise ValueError("headline_min_seeds must be >= 1")

    def fractions_of(self, protocol: str) -> tuple[float, ...]:
        """The label fractions `protocol` runs at."""
        return self.protocol_fractions.get(protocol, self.fractions)


# The benchmark's probe: the probe job's absolute C (scikit-learn's, multiplying the summed loss)
# for every subset size, centred on the last CIFAR-10 choices (all 3e-3, the old grid's top), and
# extended by half-decades at an edge: a subset of another size finds its own optimum there. (A
# grid scaled to keep the per-sample regularisation, `grid_rows`, missed at 500 labels: conv2's
# best C was more than 3 half-decades below the scaled grid.) 5-fold cross-validation below 2,000
# rows (the 1 % subset: 500 images, where a 10 % carve would leave 50 validation images).
BENCHMARK_PROBE = ProbeSettings(c_grid=(0.001, 0.003, 0.01), cv_below=2000, extend_steps=4)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).split(",") if v.strip())


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def parse_protocol_fractions(items: list[str]) -> dict[str, tuple[float, ...]]:
    """['spatial=0.01,0.1', ...] -> {'spatial': (0.01, 0.1)}; ValueError naming a bad item."""
    out: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            fr = _floats(values)
        except ValueError:
            fr = ()
        if not sep or not name.strip() or not fr:
            raise ValueError(f"--protocol-fractions {item!r}: expected PROTOCOL=F1,F2,...")
        out[name.strip()] = fr
    return out


def config_from_flags(a: Mapping[str, Any]) -> BenchmarkConfig:
    """The config from `ce-benchmark`'s parsed flags (argparse dest names); comma lists split."""
    probe = dataclasses.replace(
        BENCHMARK_PROBE, c_grid=_floats(a["c_grid"]), grid_rows=a["grid_rows"],
        extend_steps=a["extend_steps"], cv_below=a["cv_below"], max_iter=a["max_iter"],
        tol=a["tol"], blas_threads=a["blas_threads"], refit=not a["no_refit"],
    )  # fmt: skip
    if not probe.c_grid or min(probe.c_grid) <= 0:
        raise ValueError(f"--c-grid must be positive numbers, got {a['c_grid']!r}")
    same = ("train_shards", "test_shards", "name", "image_size", "random_init_seeds",
            "headline_min_seeds",
            "batch_size", "extract_dims", "n_boot", "output_root", "tracking_uri", "experiment",
            "results_dir", "finetune_results")  # fmt: skip
    return BenchmarkConfig(
        encoders=tuple(parse_encoder(e) for e in a["encoder"]), layers=_words(a["layers"]),
        protocols=_words(a["protocols"]), fractions=_floats(a["fractions"]),
        protocol_fractions=parse_protocol_fractions(a.get("protocol_fractions") or []),
        raw_pixels=not a["no_raw_pixels"], keep_features=a["keep_features"], probe=probe,
        **{k: a[k] for k in same},
    )  # fmt: skip


def check_inputs(cfg: BenchmarkConfig) -> None:
    """The shards and local files named exist (MLflow URIs are checked at load)."""
    shards = {"--train-shards": cfg.train_shards, "--test-shards": cfg.test_shards}
    check_named_inputs(shards, {e.name: e.uri for e in cfg.encoders})
    if cfg.finetune_results and not Path(cfg.finetune_results).is_file():
        raise FileNotFoundError(f"--finetune-results {cfg.finetune_results}: no such file")


def parse_part(text: str) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n; '' -> None."""
    if not text:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ValueError(f"--part {text!r}: expected i/n with 0 <= i < n")
    return int(i), int(n)
