"""The benchmark job's body: units (`evaluation.benchmark`), choices on validation
(`evaluation.selection`), files (`evaluation.bench_report`), and one MLflow parent run with a
child run per encoder and seed.

A rerun with the same output root and name resumes: done units are read back, and the MLflow
runs it opened before (ids kept in <out>/mlflow_runs.json) are reopened, not duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from evaluation.bench_config import BenchmarkConfig
from evaluation.bench_report import (
    ingest_finetune,
    label_efficiency_plot,
    mark_choices,
    results_csv,
    summary_markdown,
)
from evaluation.benchmark import correctness_of, load_encoders, run_encoder
from evaluation.selection import gaps, headline_estimates
from pipeline.precision import capabilities, cpu_model
from pipeline.storage import default_sqlite_uri, local_root
from pipeline.tracking import RunLogger, check_tracking, client, new_run, tracked_run

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # what MLflow's UI nests child runs by


@dataclass(frozen=True)
class BenchmarkResult:
    run_id: str
    tracking_uri: str
    out_dir: Path
    table: pd.DataFrame  # one row per (encoder, seed, protocol, label_fraction, layer)
    headline: pd.DataFrame
    gap: pd.DataFrame
    summary_md: str

    def summary(self) -> str:
        where = f"MLflow run {self.run_id} in {self.tracking_uri}; outputs in {self.out_dir}"
        return f"{self.summary_md}\n{where}"


class RunIds:
    """The parent and child run ids of one benchmark folder, kept across reruns."""

    def __init__(self, out: Path, uri: str, experiment: str) -> None:
        self.path, self.uri, self.experiment = out / "mlflow_runs.json", uri, experiment
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        same = saved.get("tracking_uri") == uri and saved.get("experiment") == experiment
        self.ids: dict[str, str] = saved.get("runs", {}) if same else {}

    def get(self, key: str, run_name: str, parent: str | None = None) -> str:
        """The run for `key`: the one opened before (set RUNNING again) or a new one."""
        if key in self.ids:
            try:
                client(self.uri).update_run(self.ids[key], status="RUNNING")
                return self.ids[key]
            except Exception as err:  # noqa: BLE001 - deleted or foreign: open a new one
                log.warning("MLflow run %s for %s not reusable (%s)", self.ids[key], key, err)
        tags = {PARENT_TAG: parent} if parent else {}
        self.ids[key] = new_run(self.uri, self.experiment, run_name, tags)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"tracking_uri": self.uri, "experiment": self.experiment,
                                         "runs": self.ids}, indent=1))  # fmt: skip
        return self.ids[key]


def _metric(*parts: object) -> str:
    # MLflow metric names take letters, digits and _ - . / space only.
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(p)) for p in parts)


def child_metrics(rows: list[dict]) -> dict[str, float]:
    """Per row: validation and test top-1, the interval, C and whether it sat at the edge, and
    the validation top-1 at every C tried."""
    out: dict[str, float] = {}
    for r in rows:
        where = (r["protocol"], f"f{r['label_fraction']:g}", r["layer"])
        for m in ("val_top1", "test_top1", "test_ci_low", "test_ci_high", "C"):
            out[_metric(m, *where)] = float(r[m])
        out[_metric("probe_C_at_edge", *where)] = float(r["C_at_edge"])
        for c, v in json.loads(r["val_by_C"]).items():
            out[_metric("val_top1_C", c, *where)] = float(v)
    return out


def parent_metrics(head: pd.DataFrame, gap: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in head.itertuples(index=False):
        where = (r.protocol, f"f{r.label_fraction:g}", r.kind)
        for m in ("val_top1", "test_top1", "test_sd", "ci_low", "ci_high"):
            out[_metric("headline", m, *where)] = float(getattr(r, m))
    for g in gap.itertuples(index=False):
        where = (g.protocol, f"f{g.label_fraction:g}")
        for m in ("gap", "gap_ci_low", "gap_ci_high"):
            out[_metric(m, *where)] = float(getattr(g, m))
    return out


def config_params(cfg: BenchmarkConfig) -> dict[str, object]:
    flat = {k: v for k, v in asdict(cfg).items() if k not in ("encoders", "probe")}
    flat |= {f"probe.{k}": v for k, v in asdict(cfg.probe).items()}
    flat |= {f"encoder.{e.name}.s{e.seed}": f"{e.uri} ({e.kind})" for e in cfg.encoders}
    return flat


def machine_line(wall_s: float, computed: int, total: int, fit_s: float) -> str:
    """The machine, its load, and what this invocation and all units cost."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    isa = capabilities("cpu").describe()  # bf16 native or emulated decides what a run costs
    return (f"Machine: {cpu_model()} ({isa}), {os.cpu_count()} cores, load avg {load:.1f} at the "
            f"end. Probe fits of all {total} units: {fit_s / 60:.1f} min in all (wall, summed over "
            f"units and parts); this invocation: {wall_s / 60:.1f} min wall, {computed} units "
            f"computed, the rest resumed.")  # fmt: skip


def run_part(cfg: BenchmarkConfig, part: int, parts: int) -> int:
    """Compute (or resume) the units of every `parts`-th encoder from index `part` (the given
    encoders, then the baselines), nothing else: no MLflow, no tables. Parts run side by side
    on one output root (units are per encoder); a whole run afterwards finds every unit done
    and writes the tables and the MLflow runs. Returns the units now done for this part."""
    if not 0 <= part < parts:
        raise ValueError(f"--part must be i/n with 0 <= i < n, got {part}/{parts}")
    root = local_root(cfg.output_root)
    units_dir = root / "benchmark" / cfg.name / "units"
    done = 0
    uri = cfg.tracking_uri or default_sqlite_uri(cfg.output_root, "tracking_uri")
    for i, item in enumerate(load_encoders(cfg, root / "feature_cache" / "downloads", uri)):
        if i % parts == part:
            done += len(
                {r["unit"] for r in run_encoder(cfg, item, units_dir, root / "feature_cache")}
            )
    return done


def run_benchmark(cfg: BenchmarkConfig) -> BenchmarkResult:
    """Run (or resume) the benchmark; see the module docstring."""
    t0 = time.perf_counter()
    root = local_root(cfg.output_root)
    out = root / "benchmark" / cfg.name
    uri = cfg.tracking_uri or default_sqlite_uri(cfg.output_root, "tracking_uri")
    check_tracking(uri)  # fail before an hour of probes, not after
    ids = RunIds(out, uri, cfg.experiment)
    parent = ids.get("parent", f"benchmark-{cfg.name}")
    units_dir, before = out / "units", _count(out / "units")
    with tracked_run(uri, parent):
        RunLogger(uri, parent).params(config_params(cfg))
        rows: list[dict] = []
        for item in load_encoders(cfg, root / "feature_cache" / "downloads", uri):
            s = item.spec
            child = ids.get(f"{s.name}/s{s.seed}", f"{s.name}-s{s.seed}", parent)
            with tracked_run(uri, child):
                got = run_encoder(cfg, item, units_dir, root / "feature_cache")
                logger = RunLogger(uri, child)
                logger.params({"uri": s.uri, "kind": s.kind, "seed": s.seed, "name": s.name})
                logger.metrics(child_metrics(got), step=0)
            rows += got
        table = pd.DataFrame(rows)
        units = table.drop_duplicates("unit")
        n_units, fit_s = len(units), float(units["fit_seconds"].sum())
        if cfg.finetune_results:
            table = pd.concat([table, ingest_finetune(cfg.finetune_results)], ignore_index=True)
        note = machine_line(time.perf_counter() - t0, _count(units_dir) - before, n_units, fit_s)
        result = _finish(cfg, mark_choices(table, cfg.headline_min_seeds), out, uri, parent, note)
        logger = RunLogger(uri, parent)
        logger.metrics(parent_metrics(result.headline, result.gap), step=0)
        for f in sorted(out.iterdir()):
            if f.is_file() and f.suffix in (".parquet", ".csv", ".md", ".png"):
                logger.file(f, "benchmark")
    return result


def _count(units_dir: Path) -> int:
    return len(list(units_dir.glob("*.json"))) if units_dir.is_dir() else 0


def _finish(
    cfg: BenchmarkConfig, table: pd.DataFrame, out: Path, uri: str, run_id: str, note: str
) -> BenchmarkResult:
    """Headline, gap and every file of the benchmark folder (and of results_dir)."""
    correct = correctness_of(out / "units")
    head = headline_estimates(table, correct, cfg.n_boot)
    gap = gaps(table, correct, n_boot=cfg.n_boot)
    table.to_parquet(out / "table.parquet", index=False)
    table.to_csv(out / "table.csv", index=False)
    head.to_csv(out / "headline.csv", index=False)
    gap.to_csv(out / "gap.csv", index=False)
    results_csv(table, out / f"{cfg.name}.csv")
    md = summary_markdown(head, gap, table, [note])
    (out / "summary.md").write_text(md)
    label_efficiency_plot(table, out / "label_efficiency.png")
    if cfg.results_dir:
        dst = Path(cfg.results_dir)
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / f"{cfg.name}.csv", dst / f"{cfg.name}.csv")
        shutil.copyfile(out / "summary.md", dst / f"{cfg.name}_summary.md")
        shutil.copyfile(out / "label_efficiency.png", dst / f"{cfg.name}_label_efficiency.png")
        for table_name in ("headline", "gap"):  # their intervals need the per-image results
            shutil.copyfile(out / f"{table_name}.csv", dst / f"{cfg.name}_{table_name}.csv")
    return BenchmarkResult(run_id, uri, out, table, head, gap, md)
