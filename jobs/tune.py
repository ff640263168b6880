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

from pipeline.search import SearchResult, load_settings, run_search


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
