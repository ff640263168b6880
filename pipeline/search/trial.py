"""One trial: a Tune function trainable that runs one tracked pretraining run (a child of the
search's MLflow run), the clean-up of the child runs Tune stopped before they could close, and
finding the encoder of the best trial that finished.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import flatten, to_dict
from pipeline.search.settings import TuneSettings
from pipeline.search.space import trial_config
from pipeline.storage import join
from pipeline.tracking import RunLogger, client, start_or_resume_run, tracked_run

# Builds a trial's per-checkpoint score from its config and the search's kNN settings
# (evaluation.knn_score.KnnScore; passed in, since pipeline/ never imports evaluation/).
MakeScore = Callable[[Any, Any], Callable[[Any], dict[str, float]]]


def run_trial(params: dict[str, Any], *, base: dict, settings: TuneSettings, root: str,
              uri: str, parent_run_id: str, make_score: MakeScore) -> None:  # fmt: skip
    """A Tune function trainable: one pretraining run, reported to Tune via its callback, with
    `make_score(cfg, settings.probe)` run at each checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.ray_train import build_trainer

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{settings.name}-{trial_id}"
    # Trials never register their encoder: a search would add one model version per trial.
    cfg = trial_config(
        base, params, output_root=join(root, "trials"), run_name=run_name, register_model=""
    )
    tags = {"mlflow.parentRunId": parent_run_id, "ce.trial_id": trial_id}
    run_id, resumed = start_or_resume_run(uri, cfg.run.name, run_name, tags=tags)
    if not resumed:
        RunLogger(uri, run_id).params(flatten(to_dict(cfg)))
    trainer = build_trainer(
        cfg, run_name=run_name, tracking_uri=uri, mlflow_run_id=run_id,
        callbacks=[TuneReportCallback()], extra_scores=make_score(cfg, settings.probe),
    )  # fmt: skip
    with tracked_run(uri, run_id):
        trainer.fit()


def close_stopped_trials(uri: str, parent_id: str, errored: set[str]) -> None:
    """Trials ASHA stopped early are ended by Tune before (or while) their driver closes the
    MLflow run, which is then left RUNNING, FAILED or KILLED: mark them KILLED, with a tag
    saying why. Trials that really failed (`errored` trial ids) keep FAILED."""
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


def best_trial_encoder(uri: str, parent_run_id: str, trial_ids: list[str]) -> str:
    """The runs:/ URI of the encoder of the best trial that finished (`trial_ids` best first).
    A trial ASHA stopped early never reached the end of training, where the encoder is logged."""
    c = client(uri)
    experiment = c.get_run(parent_run_id).info.experiment_id
    for trial_id in trial_ids:
        runs = c.search_runs(
            [experiment],
            filter_string=f"tags.`ce.trial_id` = '{trial_id}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if runs:
            return f"runs:/{runs[0].info.run_id}/encoder/generator.pt"
    raise RuntimeError(f"no trial of search {parent_run_id} finished: {trial_ids}")
