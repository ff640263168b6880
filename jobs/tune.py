"""Search the loss weights, learning rates and mask type with Ray Tune.

    python -m jobs.tune --config jobs/configs/tune_digits.yaml [num_samples=8 ...]

Each trial is a full Ray Train pretraining run built by `pipeline.ray_train.build_trainer`, the
same function `jobs.pretrain` uses. Trials are ranked by a score that does not depend on the
weights being searched (the weighted total loss would): the held-out masked reconstruction error
(`val_rec_l2`) or a kNN probe on frozen features of a labelled subset (`knn_top1`); both are
recorded at every checkpoint and ASHA stops weak trials on the chosen one. Running the same
command again after an interruption continues the search.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Tune's sampler base and its wrapper of a seed / numpy RNG (what its own samplers draw from).
from ray.tune.search.sample import Float, LogUniform, _BackwardsCompatibleNumpyRng

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_config,
    flatten,
    from_dict,
    to_dict,
    validate,
)
from pipeline.data.masks import needs_full_image_output

SearchMetric = Literal["val_rec_l2", "knn_top1"]
MODES = {"val_rec_l2": "min", "knn_top1": "max"}


@dataclass(frozen=True)
class AshaSettings:
    grace_period: int = 1  # checkpoint reports a trial always gets before it may be stopped
    reduction_factor: int = 2


@dataclass(frozen=True)
class KnnScoreSettings:
    """The kNN score of each checkpoint (`KnnScore`); not the linear probe's settings."""

    train_samples: int = 1000  # labelled training images whose features the kNN votes with
    val_samples: int = 500  # held-out images it classifies
    layer: str = ""  # "" = the deepest encoder layer
    max_dim: int = 2048  # pooled feature size cap


@dataclass(frozen=True)
class TuneSettings:
    name: str = "tune"  # the search's name: Tune experiment, MLflow parent run
    pretrain_config: str = ""  # a jobs.pretrain YAML (relative paths: to this file)
    overrides: dict[str, Any] = field(default_factory=dict)  # per-trial budget, e.g. max_steps
    space: dict[str, dict] = field(default_factory=dict)  # dotted key -> distribution
    num_samples: int = 4
    objective: SearchMetric = "knn_top1"
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs hold without starving
    max_failures: int = 1  # retries of a failed trial
    seed: int = 0  # the search's sampler: the same seed draws the same trial configs
    asha: AshaSettings = field(default_factory=AshaSettings)
    probe: KnnScoreSettings = field(default_factory=KnnScoreSettings)  # the kNN score's YAML key


# ---- the search space ----------------------------------------------------------------------


def _domain(key: str, spec: dict) -> Any:
    """One YAML distribution -> a Tune domain. Forms:
    {loguniform: [lo, hi], zero_prob: p}  (p > 0 adds exact zeros: "lambda_adv including 0"),
    {uniform: [lo, hi]}, {choice: [a, b, ...]}."""
    from ray import tune

    kinds = {"loguniform", "uniform", "choice"} & set(spec)
    extra = set(spec) - {"loguniform", "uniform", "choice", "zero_prob"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"space.{key}: give exactly one of loguniform/uniform/choice, got {spec}")
    (kind,) = kinds
    arg = spec[kind]
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"space.{key}: choice needs a non-empty list, got {arg!r}")
        return tune.choice(arg)
    if not (isinstance(arg, list) and len(arg) == 2 and all(_is_num(v) for v in arg)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high], got {arg!r}")
    lo, hi = float(arg[0]), float(arg[1])
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        raise ConfigError(f"space.{key}: need 0 < low < high for loguniform, low < high: {arg}")
    if kind == "uniform":
        return tune.uniform(lo, hi)
    p0 = float(spec.get("zero_prob", 0.0))
    if not 0 <= p0 < 1:
        raise ConfigError(f"space.{key}: zero_prob must be in [0, 1), got {p0}")
    if p0 == 0:
        return tune.loguniform(lo, hi)
    domain = Float(lo, hi)
    domain.set_sampler(_ZeroOrLogUniform(p0))
    return domain


class _ZeroOrLogUniform(LogUniform):
    """Exactly 0.0 with probability p0, else log-uniform in [lower, upper]. Draws from the
    search's random_state, as Tune's own samplers do, so a seeded search repeats."""

    def __init__(self, p0: float):
        self.p0 = p0

    def sample(self, domain, config=None, size: int = 1, random_state=None):
        rng = random_state
        if not isinstance(rng, _BackwardsCompatibleNumpyRng):
            rng = _BackwardsCompatibleNumpyRng(rng)
        zero = rng.uniform(0.0, 1.0, size=size) < self.p0
        logs = rng.uniform(math.log(domain.lower), math.log(domain.upper), size=size)
        items = [0.0 if z else float(math.exp(v)) for z, v in zip(zero, logs, strict=True)]
        return items if size > 1 else items[0]

    def __str__(self) -> str:
        return f"ZeroOrLogUniform(p0={self.p0})"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _extremes(spec: dict) -> list[Any]:
    """The values a distribution can reach at its edges, for validating against the config."""
    if "choice" in spec:
        return list(spec["choice"])
    lo, hi = spec.get("loguniform") or spec.get("uniform")
    return [lo, hi] + ([0.0] if spec.get("zero_prob") else [])


def build_space(settings: TuneSettings, base: dict) -> dict[str, Any]:
    """Tune param space from the YAML; every value the space can reach must form a valid
    pretrain config, checked here before anything starts."""
    if not settings.space:
        raise ConfigError("tune: the search space is empty")
    known = set(flatten(to_dict(from_dict(base))))  # every key, defaults included
    space = {}
    for key, spec in settings.space.items():
        if key not in known:
            raise ConfigError(f"space.{key}: not a config key (known: {sorted(known)})")
        space[key] = _domain(key, spec)
        for value in _extremes(spec):
            trial_config(base, {key: value})  # raises ConfigError naming the problem
    return space


def trial_config(base: dict, params: dict[str, Any], **run: Any) -> Config:
    """The pretrain config of one trial: base + sampled params (+ run.* fields)."""
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                 for k, v in params.items()]  # fmt: skip
    if needs_full_image_output(params.get("mask.kind")):
        # Random masks need the whole image back (docs/method.md); implied, not searched.
        overrides.append("model.full_image_output=true")
    overrides += [f"run.{k}={v}" for k, v in run.items()]
    try:
        return validate(from_dict(apply_overrides(base, overrides)))
    except ConfigError as e:
        raise ConfigError(f"search space gives an invalid config {params}: {e}") from e


# ---- one trial -----------------------------------------------------------------------------


class KnnScore:
    """Cheap downstream score at each checkpoint: kNN top-1 of frozen, pooled encoder features,
    a labelled subset of the training shards voting for held-out images. The images are decoded
    once, on the first call, in the rank-0 worker."""

    def __init__(self, cfg: Config, probe: KnnScoreSettings) -> None:
        self.cfg, self.probe = cfg, probe
        self._data: tuple[list[dict], list[dict]] | None = None

    def _batches(self, urls: str, n: int) -> list[dict]:
        from pipeline.data import build_loader
        from pipeline.passes import take_batches

        loader = build_loader(self.cfg.data, self.cfg.mask, urls=urls, train=False)
        return list(take_batches(loader, n_images=n))

    def __call__(self, trainer) -> dict[str, float]:
        from evaluation.features import extract
        from evaluation.knn import knn_classify
        from pipeline.passes import eval_mode

        if self._data is None:
            val = self.cfg.data.val_shards or self.cfg.data.train_shards
            self._data = (
                self._batches(self.cfg.data.train_shards, self.probe.train_samples),
                self._batches(val, self.probe.val_samples),
            )
        layer = self.probe.layer or trainer.g.feature_layers[-1]
        with eval_mode(trainer.g) as g:
            train = extract(g, [layer], self._data[0], self.probe.max_dim)[layer]
            test = extract(g, [layer], self._data[1], self.probe.max_dim)[layer]
        classes = int(max(train.labels.max(), test.labels.max())) + 1
        scores = knn_classify(train.x, train.labels, test.x, test.labels, num_classes=classes)
        return {"knn_top1": scores["knn_top1"]}


def run_trial(params: dict[str, Any], *, base: dict, settings: TuneSettings, root: str,
              uri: str, parent_run_id: str) -> None:  # fmt: skip
    """A Tune function trainable: one pretraining run, reported to Tune via its callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.ray_train import build_trainer
    from pipeline.tracking import RunLogger, start_or_resume_run, tracked_run

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{settings.name}-{trial_id}"
    cfg = trial_config(base, params, output_root=str(Path(root) / "trials"), run_name=run_name)
    tags = {"mlflow.parentRunId": parent_run_id, "ce.trial_id": trial_id}
    run_id, resumed = start_or_resume_run(uri, cfg.run.name, run_name, tags=tags)
    if not resumed:
        RunLogger(uri, run_id).params(flatten(to_dict(cfg)))
    trainer = build_trainer(
        cfg, run_name=run_name, tracking_uri=uri, mlflow_run_id=run_id,
        callbacks=[TuneReportCallback()], extra_scores=KnnScore(cfg, settings.probe),
    )  # fmt: skip
    with tracked_run(uri, run_id):
        trainer.fit()


# ---- the search ----------------------------------------------------------------------------


def load_settings(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[TuneSettings, dict]:
    """The search settings and the base pretrain config dict (budget overrides applied)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tune config not found: {p}")
    raw = apply_overrides(yaml.safe_load(p.read_text()) or {}, overrides or [])
    settings: TuneSettings = from_dict(raw, TuneSettings)
    if not settings.pretrain_config:
        raise ConfigError("tune: pretrain_config (a jobs.pretrain YAML) is required")
    base_path = (p.parent / settings.pretrain_config).resolve()
    if not base_path.is_file():
        raise ConfigError(f"tune: pretrain_config not found: {base_path}")
    budget = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
              for k, v in settings.overrides.items()]  # fmt: skip
    base = apply_overrides(yaml.safe_load(base_path.read_text()) or {}, budget)
    validate(from_dict(base))
    if settings.num_samples < 1:
        raise ConfigError("tune: num_samples must be >= 1")
    return settings, base


def concurrent_trials(settings: TuneSettings, cfg: Config, cluster_cpus: float) -> int:
    """Trials whose workers fit the cluster at once. Trial drivers reserve no CPU (they only
    wait on their workers), so admitted trials can never starve their own workers."""
    if settings.max_concurrent_trials > 0:
        return settings.max_concurrent_trials
    per_trial = max(1, cfg.run.num_workers) * cfg.run.cpus_per_worker
    return max(1, int(cluster_cpus // per_trial))


@dataclass(frozen=True)
class SearchResult:
    table: Any  # pandas DataFrame, one row per trial
    best_config_path: Path
    parent_run_id: str
    tracking_uri: str


def run_search(settings: TuneSettings, base: dict, address: str = "") -> SearchResult:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline.runtime import connect_ray, preflight, resolve_paths
    from pipeline.tracking import RunLogger, start_or_resume_run, tracked_run

    base_cfg = resolve_paths(validate(from_dict(base)))
    base = to_dict(base_cfg)  # absolute paths: trials run in other directories
    space = build_space(settings, base)
    uri = preflight(base_cfg)
    print(f"[tune] {connect_ray(address or base_cfg.run.address)}; MLflow at {uri}", flush=True)
    root = (Path(base_cfg.run.output_root) / "tune" / settings.name).resolve()
    parent_id, resumed = start_or_resume_run(uri, base_cfg.run.name, settings.name,
                                             tags={"ce.kind": "search"})  # fmt: skip
    if not resumed:
        RunLogger(uri, parent_id).params({f"search.{k}": v for k, v in settings.space.items()})

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            settings=settings,
            root=str(root),
            uri=uri,
            parent_run_id=parent_id,
        ),  # fmt: skip
        # Drivers only wait on their Train workers: no CPU, so admitted trials never hold the
        # CPUs their own workers need. A placement group bundle cannot be empty, hence the
        # token 1 MiB of Ray's "memory" resource.
        {"CPU": 0, "memory": 1 << 20},
    )
    mode = MODES[settings.objective]
    concurrency = concurrent_trials(settings, base_cfg, ray.cluster_resources().get("CPU", 1))
    tune_dir = root / "ray_tune"
    if tune.Tuner.can_restore(str(tune_dir / settings.name)):
        print(f"[tune] resuming the search in {tune_dir / settings.name}", flush=True)
        tuner = tune.Tuner.restore(str(tune_dir / settings.name), trainable,
                                   resume_errored=True)  # fmt: skip
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=settings.objective, mode=mode, num_samples=settings.num_samples,
                max_concurrent_trials=concurrency,
                search_alg=BasicVariantGenerator(random_state=settings.seed),
                scheduler=ASHAScheduler(grace_period=settings.asha.grace_period,
                                        reduction_factor=settings.asha.reduction_factor),
            ),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=str(tune_dir),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            ),
        )  # fmt: skip
    with tracked_run(uri, parent_id):
        results = tuner.fit()
        return _write_results(results, settings, base, root, uri, parent_id)


def _write_results(results, settings: TuneSettings, base: dict, root: Path, uri: str,
                   parent_id: str) -> SearchResult:  # fmt: skip
    from pipeline.tracking import RunLogger

    table = results.get_dataframe(filter_metric=settings.objective,
                                  filter_mode=MODES[settings.objective])  # fmt: skip
    keep = [
        c
        for c in table.columns
        if c.startswith("config/")
        or c in ("trial_id", "step", "training_iteration", "val_rec_l2", "val_fill_l2", "knn_top1")
    ]
    table = table[keep].sort_values(settings.objective,
                                    ascending=MODES[settings.objective] == "min")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    table.to_parquet(root / "trials.parquet", index=False)
    table.to_csv(root / "trials.csv", index=False)

    best = results.get_best_result(metric=settings.objective, mode=MODES[settings.objective],
                                   scope="all")  # fmt: skip
    # The winner's config, with the base run settings (not the trial's run name or folder), so
    # `python -m jobs.pretrain --config best_config.yaml` trains it as a fresh run.
    best_cfg = trial_config(base, best.config)
    best_path = root / "best_config.yaml"
    best_path.write_text(dump_config(best_cfg))

    _close_stopped_trials(uri, parent_id, {r.metrics.get("trial_id") for r in results if r.error})
    logger = RunLogger(uri, parent_id)
    for f in ("trials.parquet", "trials.csv", "best_config.yaml"):
        logger.file(root / f)
    logger.metrics({f"best_{settings.objective}": float(best.metrics[settings.objective])}, 0)
    return SearchResult(table, best_path, parent_id, uri)


def _close_stopped_trials(uri: str, parent_id: str, errored: set[str]) -> None:
    """Trials ASHA stopped early are ended by Tune before (or while) their driver closes the
    MLflow run, which is then left RUNNING, FAILED or KILLED: mark them KILLED, with a tag
    saying why. Trials that really failed (`errored` trial ids) keep FAILED."""
    from pipeline.tracking import client

    c = client(uri)
    exp = c.get_run(parent_id).info.experiment_id
    children = c.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )  # fmt: skip
    for run in children:
        stopped = run.data.tags.get("ce.trial_id") not in errored
        state = run.info.status
        if state == "RUNNING" or (state in ("FAILED", "KILLED") and stopped):
            c.set_tag(run.info.run_id, "ce.stopped_early", "true")
            if state != "KILLED":  # a driver that saw Tune's stop already closed it KILLED
                c.set_terminated(run.info.run_id, status="KILLED")


def main(argv: list[str] | None = None) -> SearchResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="tune YAML (see jobs/configs/tune_*.yaml)")
    p.add_argument("--address", default="", help="Ray address (default: $RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tune YAML")
    args = p.parse_args(argv)
    settings, base = load_settings(args.config, args.overrides)
    res = run_search(settings, base, address=args.address)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.table.to_string(index=False))
    print(f"[tune] best config: {res.best_config_path}")
    print(f"[tune] MLflow parent run {res.parent_run_id} in {res.tracking_uri}")
    return res


if __name__ == "__main__":
    main()
