"""The linear-probe benchmark: encoders x protocols (gap, spatial) x label fractions x layers
against random init (several seeds) and raw pixels, chosen on validation, with 95 % intervals.

    ce-benchmark --encoder dcgan_region_rec=runs:/<id>/encoder,seed=0 \\
        --encoder dcgan_region_rec=runs:/<id2>/encoder,seed=1 \\
        --train-shards 'data/cifar10-train-{000000..000009}.tar' \\
        --test-shards 'data/cifar10-test-{000000..000001}.tar' \\
        --output-root outputs --results-dir benchmarks/results [--layers conv1,conv2]

An encoder is NAME=PATH_OR_URI[,kind=KIND][,seed=N] (a checkpoint path, runs:/..., models:/...);
seeds of one NAME are averaged. Resumable: a rerun with the same --output-root and --name skips
every finished unit. Thin: parse, check, call `evaluation.bench_run.run_benchmark`, print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import yaml

from evaluation.benchmark import BENCHMARK_PROBE, PROTOCOLS, BenchmarkConfig, parse_encoder
from jobs._cli import Work, prog_name, run_cli, run_main

PROG = ("ce-benchmark", "jobs.benchmark")
URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "s3://", "gs://")
D, P = BenchmarkConfig, BENCHMARK_PROBE


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _words(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--encoder", action="append", default=[], help="NAME=URI[,kind=K][,seed=N]; repeatable")
    add("--train-shards", required=True)
    add("--test-shards", required=True)
    add("--name", default=D.name, help="benchmark folder and results prefix (resume key)")
    add("--image-size", type=int, default=D.image_size)
    add("--layers", default="", help="comma-separated encoder layers ('' = all)")
    add("--protocols", default=",".join(D.protocols), help=f"among {list(PROTOCOLS)}")
    add("--fractions", default=",".join(f"{f:g}" for f in D.fractions), help="label fractions")
    add("--random-init-seeds", type=int, default=D.random_init_seeds)
    add("--no-raw-pixels", action="store_true", help="skip the raw-pixel baseline")
    add("--c-grid", default=",".join(f"{c:g}" for c in P.c_grid), help="C at --grid-rows rows")
    add("--grid-rows", type=int, default=P.grid_rows, help="rows the C grid is stated at")
    add("--extend-steps", type=int, default=P.extend_steps, help="half-decades past an edge")
    add("--cv-below", type=int, default=P.cv_below, help="k-fold CV below this many rows")
    add("--max-iter", type=int, default=P.max_iter)
    add("--tol", type=float, default=P.tol)
    add("--blas-threads", type=int, default=P.blas_threads, help="0 = the library default")
    add("--no-refit", action="store_true", help="score the sweep's fit (one lbfgs fit fewer)")
    add("--batch-size", type=int, default=D.batch_size)
    add("--n-boot", type=int, default=D.n_boot)
    add("--output-root", default=D.output_root)
    add("--tracking-uri", default=D.tracking_uri, help="'' = sqlite:///<output-root>/mlflow.db")
    add("--experiment", default=D.experiment)
    add("--results-dir", default=D.results_dir, help="also write <name>.csv, summary, plot here")
    add("--finetune-results", default="", help="CSV/Parquet of fine-tune rows to add")
    add("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def config_from(a: argparse.Namespace) -> BenchmarkConfig:
    probe = dataclasses.replace(
        P, c_grid=_floats(a.c_grid), grid_rows=a.grid_rows, extend_steps=a.extend_steps,
        cv_below=a.cv_below, max_iter=a.max_iter, tol=a.tol, blas_threads=a.blas_threads,
        refit=not a.no_refit,
    )  # fmt: skip
    if not probe.c_grid or min(probe.c_grid) <= 0:
        raise ValueError(f"--c-grid must be positive numbers, got {a.c_grid!r}")
    return BenchmarkConfig(
        encoders=tuple(parse_encoder(e) for e in a.encoder), train_shards=a.train_shards,
        test_shards=a.test_shards, name=a.name, image_size=a.image_size, layers=_words(a.layers),
        protocols=_words(a.protocols), fractions=_floats(a.fractions),
        random_init_seeds=a.random_init_seeds, raw_pixels=not a.no_raw_pixels, probe=probe,
        batch_size=a.batch_size, n_boot=a.n_boot, output_root=a.output_root,
        tracking_uri=a.tracking_uri, experiment=a.experiment, results_dir=a.results_dir,
        finetune_results=a.finetune_results,
    )  # fmt: skip


def check_inputs(cfg: BenchmarkConfig) -> None:
    """The shards and local files named exist (MLflow URIs are checked at load)."""
    from pipeline.data import expand_urls

    for flag, urls in (("--train-shards", cfg.train_shards), ("--test-shards", cfg.test_shards)):
        try:
            expand_urls(urls)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{flag}: {err}") from err
    for e in cfg.encoders:
        if not e.uri.startswith(URI_SCHEMES) and not Path(e.uri).expanduser().exists():
            raise FileNotFoundError(f"--encoder {e.name}={e.uri}: no such checkpoint file")
    if cfg.finetune_results and not Path(cfg.finetune_results).is_file():
        raise FileNotFoundError(f"--finetune-results {cfg.finetune_results}: no such file")


def prepare(argv: list[str] | None = None) -> Work | None:
    args = parse_args(argv)
    cfg = config_from(args)
    if args.print_config:
        plain = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists for YAML
        print(yaml.safe_dump(plain, sort_keys=False), end="", flush=True)
        return None
    check_inputs(cfg)
    return lambda: benchmark(cfg)


def benchmark(cfg: BenchmarkConfig) -> str:
    from evaluation.bench_run import run_benchmark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run_benchmark(cfg)
    print(res.summary(), flush=True)
    return res.run_id


def main(argv: list[str] | None = None) -> str | None:
    """Run the job, every exception raised; returns the parent MLflow run id."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-benchmark` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


if __name__ == "__main__":
    cli()
