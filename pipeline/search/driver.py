"""The search driver: one Tuner over the space (seeded sampler, ASHA on the chosen metric,
every trial admitted unless capped), the parent MLflow run its trials nest under, and what a
finished search leaves behind (trials table, best_config.yaml). Running the same search again
after an interruption continues it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import dump_config, from_dict, to_dict, validate
from pipeline.runtime import connect_ray, preflight, resolve_paths
from pipeline.search.settings import MODES, TuneSettings
from pipeline.search.space import build_space, trial_config
from pipeline.search.trial import MakeScore, close_stopped_trials, run_trial
from pipeline.storage import absolute, join, local_root
from pipeline.tracking import RunLogger, start_or_resume_run, tracked_run

SCORE_COLUMNS = ("trial_id", "step", "training_iteration", "val_rec_l2", "val_fill_l2", "knn_top1")


def concurrent_trials(settings: TuneSettings) -> int | None:
    """Tune's `max_concurrent_trials`: the YAML's cap, or None (no cap) for 0.

    Not sized from the CPUs the cluster holds at start: on an autoscaling cluster whose
    workers start at zero that would be one trial at a time forever. Uncapped, every trial's
    driver starts (drivers hold no CPU, `_trainable`) and its Train worker group waits for CPUs
    (Ray Train retries the placement every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s); the
    waiting placement groups are the demand the autoscaler scales up for, and trials run as
    nodes join. Each waiting trial costs a driver and a Train controller process (no CPU, a
    few hundred MB) on the cluster: cap searches of many samples."""
    return settings.max_concurrent_trials or None


@dataclass(frozen=True)
class SearchResult:
    table: Any  # pandas DataFrame, one row per trial: its final score; the chosen trial first
    best_config_path: Path
    parent_run_id: str
    tracking_uri: str
    best_trial_id: str  # the trial best_config.yaml came from: its final encoder is the one


def run_search(
    settings: TuneSettings, base: dict, address: str = "", *, make_score: MakeScore
) -> SearchResult:
    """Check the space, start or join Ray, open (or resume) the parent run, run every trial,
    write the results; the parent run ends with the search (`tracked_run`). `make_score(cfg,
    settings.probe)` is each trial's checkpoint score (evaluation.knn_score.KnnScore)."""
    base_cfg = resolve_paths(validate(from_dict(base)))
    base = to_dict(base_cfg)  # absolute paths: trials run in other directories
    space = build_space(settings, base)
    uri = preflight(base_cfg)
    print(f"[tune] {connect_ray(address or base_cfg.run.address)}; MLflow at {uri}", flush=True)
    # A string, not a Path: the output root may be an object-storage URI (pipeline.storage).
    root = join(absolute(base_cfg.run.output_root), "tune", settings.name)
    parent_id, resumed = start_or_resume_run(uri, base_cfg.run.name, settings.name,
                                             tags={"ce.kind": "search"})  # fmt: skip
    if not resumed:
        RunLogger(uri, parent_id).params({f"search.{k}": v for k, v in settings.space.items()})
    trainable = _trainable(settings, base, root, uri, parent_id, make_score)
    tuner = _tuner(trainable, space, settings, join(root, "ray_tune"))
    with tracked_run(uri, parent_id):
        results = tuner.fit()
        return _write_results(results, settings, base, root, uri, parent_id)


def _trainable(settings: TuneSettings, base: dict, root: str, uri: str, parent_id: str,
               make_score: MakeScore):  # fmt: skip
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            settings=settings,
            root=root,
            uri=uri,
            parent_run_id=parent_id,
            make_score=make_score,
        ),  # fmt: skip
        # Drivers only wait on their Train workers: no CPU, so admitted trials never hold the
        # CPUs their own workers need. A placement group bundle cannot be empty, hence the
        # token 1 MiB of Ray's "memory" resource.
        {"CPU": 0, "memory": 1 << 20},
    )


def _tuner(trainable, space: dict, settings: TuneSettings, tune_dir: str):
    """A new Tuner, or the interrupted one restored from `tune_dir` (errored trials retried)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    previous = join(tune_dir, settings.name)
    if tune.Tuner.can_restore(previous):
        print(f"[tune] resuming the search in {previous}", flush=True)
        return tune.Tuner.restore(previous, trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=settings.objective, mode=MODES[settings.objective],
            num_samples=settings.num_samples, max_concurrent_trials=concurrent_trials(settings),
            search_alg=BasicVariantGenerator(random_state=settings.seed),
            scheduler=ASHAScheduler(grace_period=settings.asha.grace_period,
                                    reduction_factor=settings.asha.reduction_factor),
        ),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=tune_dir,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        ),
    )  # fmt: skip


def final_ranking(results, metric: str, mode: str, max_steps: int) -> Any:
    """One row per trial with its *final* report (config, step, scores), the trials that ran
    all `max_steps` first, each group best first by `metric`: row 0 is the chosen trial.

    The final score, not the best at any checkpoint: the encoder a trial leaves (its MLflow
    encoder, what end_to_end probes) is the final one, and best_config.yaml retrains the
    config for the full budget, which reproduces the final score, not an intermediate one.
    Trials ASHA stopped early have no final encoder and a score from fewer steps, so they rank
    after every completed trial."""
    import pandas as pd

    rows = [
        {**{f"config/{k}": v for k, v in r.config.items()}, **r.metrics}
        for r in results
        if r.metrics and metric in r.metrics
    ]
    if not rows:
        raise RuntimeError(f"no trial of the search reported {metric}")
    table = pd.DataFrame(rows)
    table["completed"] = table["step"] >= max_steps
    keep = [c for c in table.columns if c.startswith("config/") or c in SCORE_COLUMNS]
    table = table[[*keep, "completed"]].sort_values(
        ["completed", metric], ascending=[False, mode == "min"], kind="stable"
    )
    return table.reset_index(drop=True)


def _write_results(results, settings: TuneSettings, base: dict, root: str, uri: str,
                   parent_id: str) -> SearchResult:  # fmt: skip
    """trials.parquet / .csv (chosen trial first, see final_ranking) and best_config.yaml
    under `root` (its local mirror for a URI root: pipeline.storage.local_root), logged to the
    parent run with the chosen trial's final score; stopped trials' runs closed."""
    metric, mode = settings.objective, MODES[settings.objective]
    table = final_ranking(results, metric, mode, from_dict(base).train.max_steps)
    root = local_root(root)
    root.mkdir(parents=True, exist_ok=True)
    table.to_parquet(root / "trials.parquet", index=False)
    table.to_csv(root / "trials.csv", index=False)

    best = table.iloc[0]
    (chosen,) = [r for r in results if r.metrics and r.metrics.get("trial_id") == best.trial_id]
    # The winner's config, with the base run settings (not the trial's run name or folder), so
    # `python -m jobs.pretrain --config best_config.yaml` trains it as a fresh run.
    best_path = root / "best_config.yaml"
    best_path.write_text(dump_config(trial_config(base, chosen.config)))

    close_stopped_trials(uri, parent_id, {r.metrics.get("trial_id") for r in results if r.error})
    logger = RunLogger(uri, parent_id)
    for f in ("trials.parquet", "trials.csv", "best_config.yaml"):
        logger.file(root / f)
    logger.metrics({f"best_{metric}": float(best[metric])}, 0)
    return SearchResult(table, best_path, parent_id, uri, str(best["trial_id"]))
