"""The hyper-parameter search: Ray Tune over the pretrain config, each trial a full Ray Train
run, ranked by a score the searched weights cannot game. One module per concern:

    settings.py  the tune YAML: TuneSettings (+ ASHA, kNN score), SearchMetric, load_settings
    space.py     the search-space language (loguniform with exact zeros, uniform, choice) ->
                 Tune domains, checked against the config; trial_config
    trial.py     run_trial, one trial's tracked pretraining run; closing runs Tune stopped
    driver.py    run_search: the Tuner (ASHA, seeded sampler, resume), results, best config
                 (final_ranking: the completed trial with the best final score)

`jobs.tune` parses and calls `load_settings` then `run_search(..., make_score=KnnScore)`: the
per-checkpoint kNN score is evaluation's (evaluation/knn_score.py), passed in, so this package
never imports evaluation/.
"""

from pipeline.search.driver import SearchResult, concurrent_trials, final_ranking, run_search
from pipeline.search.settings import SearchMetric, TuneSettings, load_settings
from pipeline.search.space import build_space, trial_config

__all__ = [
    "SearchMetric",
    "SearchResult",
    "TuneSettings",
    "build_space",
    "concurrent_trials",
    "final_ranking",
    "load_settings",
    "run_search",
    "trial_config",
]
