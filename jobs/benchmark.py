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

import yaml

from evaluation.bench_config import (
    BENCHMARK_PROBE,
    PROTOCOLS,
    BenchmarkConfig,
    check_inputs,
    config_from_flags,
    parse_part,
)
from jobs._cli import Work, prog_name, run_cli, run_main

PROG = ("ce-benchmark", "jobs.benchmark")
D, P = BenchmarkConfig, BENCHMARK_PROBE


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
    add("--protocol-fractions", action="append", default=[], metavar="PROTOCOL=F1,F2",
        help="a protocol's own label fractions (default --fractions); repeatable")  # fmt: skip
    add("--random-init-seeds", type=int, default=D.random_init_seeds)
    add("--headline-min-seeds", type=int, default=D.headline_min_seeds,
        help="seeds a headline encoder needs, where its kind has one")  # fmt: skip
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
    add("--extract-dims", type=int, default=D.extract_dims, help="feature values a pass holds")
    add("--keep-features", action="store_true", help="keep the feature cache after the units")
    add("--n-boot", type=int, default=D.n_boot)
    add("--output-root", default=D.output_root)
    add("--tracking-uri", default=D.tracking_uri, help="'' = sqlite:///<output-root>/mlflow.db")
    add("--experiment", default=D.experiment)
    add("--results-dir", default=D.results_dir, help="also write <name>.csv, summary, plot here")
    add("--finetune-results", default="", help="CSV/Parquet of fine-tune rows to add")
    add("--part", default="", help="i/n: only units of every n-th encoder from i (no MLflow, "
        "no tables); run parts side by side, then once without --part")  # fmt: skip
    add("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def prepare(argv: list[str] | None = None) -> Work | None:
    args = parse_args(argv)
    cfg = config_from_flags(vars(args))
    if args.print_config:
        plain = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists for YAML
        print(yaml.safe_dump(plain, sort_keys=False), end="", flush=True)
        return None
    check_inputs(cfg)
    part = parse_part(args.part)
    return lambda: benchmark(cfg, part)


def benchmark(cfg: BenchmarkConfig, part: tuple[int, int] | None = None) -> str | None:
    from evaluation.bench_run import run_benchmark, run_part

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if part is not None:
        print(f"part {part[0]}/{part[1]}: {run_part(cfg, *part)} units done", flush=True)
        return None
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
