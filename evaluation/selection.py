"""What the benchmark reports as its result, chosen on validation only, with intervals.

The benchmark's long table has one row per (encoder, kind, protocol, label_fraction, seed,
layer). Two choices are made on it, both from validation top-1 alone:

* per encoder (a variant, e.g. `dcgan_region_rec`, with one or more seeds), per protocol and
  label fraction: the layer with the best validation top-1, averaged over its seeds
  (`chosen_on_val`);
* per kind (context_encoder / random_init / raw_pixels / ...), protocol and label fraction: the
  (encoder, layer) with the best mean validation top-1 among the kind's chosen rows
  (`headline`), among the encoders with at least `min_seeds` seeds where the kind has any: a
  headline must carry its seed-to-seed variation (a one-seed variant's interval holds only
  the test images'), while a kind with one seed everywhere (raw pixels) still has a headline.

`choose` takes only the validation columns (`VAL_COLUMNS`): the test scores are not passed in,
so they cannot enter a choice. Test scores then come along for every row; the headline and the
gap (`gaps`) read only headline rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from evaluation.intervals import Estimate, bootstrap_gap, newcombe_diff

# The columns a choice may read: identity and validation top-1, nothing from the test split.
GROUP = ["kind", "protocol", "label_fraction"]
VAL_COLUMNS = [*GROUP, "encoder", "seed", "layer", "val_top1"]
CONTEXT, RANDOM, PIXELS = "context_encoder", "random_init", "raw_pixels"


def choose(val: pd.DataFrame, min_seeds: int = 1) -> pd.DataFrame:
    """Mark the val-chosen rows: returns `val` (columns VAL_COLUMNS only) plus bool columns
    `chosen_on_val` (the encoder's best layer) and `headline` (the kind's best encoder + layer,
    among its encoders with >= `min_seeds` seeds where it has any). Ties go to the first in
    table order (the encoders' and layers' given order)."""
    missing = [c for c in VAL_COLUMNS if c not in val.columns]
    if missing:
        raise ValueError(f"choose needs the columns {VAL_COLUMNS}; missing {missing}")
    df = val[VAL_COLUMNS].reset_index(drop=True)
    keys = [*GROUP, "encoder", "layer"]
    mean = df.groupby(keys, sort=False).agg(
        val_top1=("val_top1", "mean"), seeds=("seed", "nunique")).reset_index()  # fmt: skip
    best_layer = _first_max(mean, [*GROUP, "encoder"])
    enough = best_layer.seeds >= min_seeds
    has_enough = enough.groupby([best_layer[g] for g in GROUP]).transform("any")
    best_encoder = _first_max(best_layer[enough | ~has_enough], GROUP)
    as_set = lambda d: set(d[keys].itertuples(index=False, name=None))  # noqa: E731
    chosen, headline = as_set(best_layer), as_set(best_encoder)
    rows = list(df[keys].itertuples(index=False, name=None))
    df["chosen_on_val"] = [r in chosen for r in rows]
    df["headline"] = [r in headline for r in rows]
    return df


def _first_max(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Per group, the first row with the highest val_top1 (stable order)."""
    idx = df.groupby(by, sort=False)["val_top1"].idxmax()  # idxmax returns the first maximum
    return df.loc[idx.to_numpy()]


Correctness = Callable[[pd.Series], np.ndarray | None]


def headline_estimates(
    table: pd.DataFrame, correct: Correctness, n_boot: int = 2000
) -> pd.DataFrame:
    """One row per (kind, protocol, label_fraction): its headline encoder and layer, the seeds,
    mean validation and test top-1 (percent), the sd of test top-1 across seeds and a 95 %
    interval of the mean (bootstrap over test images and seeds; Wilson's from the row when per-
    image results are missing)."""
    out = []
    for key, rows in table[table["headline"]].groupby(GROUP, sort=False):
        mats = [correct(r) for _, r in rows.iterrows()]
        first = rows.iloc[0]
        if all(m is not None for m in mats):
            est = bootstrap_gap(np.stack(mats), n_boot=n_boot)
            low, high, sd = 100 * est.low, 100 * est.high, 100 * est.sd_a
        else:
            low, high = rows["test_ci_low"].mean(), rows["test_ci_high"].mean()
            sd = float(rows["test_top1"].std(ddof=1)) if len(rows) > 1 else 0.0
        out.append(dict(zip(GROUP, key, strict=True)) | {
            "encoder": first["encoder"], "layer": first["layer"], "seeds": len(rows),
            "val_top1": rows["val_top1"].mean(), "test_top1": rows["test_top1"].mean(),
            "test_sd": sd, "ci_low": low, "ci_high": high,
        })  # fmt: skip
    return pd.DataFrame(out)


def gaps(
    table: pd.DataFrame,
    correct: Correctness,
    a_kind: str = CONTEXT,
    b_kind: str = RANDOM,
    n_boot: int = 2000,
) -> pd.DataFrame:
    """Per (protocol, label_fraction) where both kinds have a headline: mean test top-1 of a's
    headline minus b's (percent) and its 95 % interval. Paired bootstrap over the shared test
    images (with seeds resampled on each side) when every row has per-image results; else
    Newcombe's interval from the seed-mean counts (independent samples)."""
    head = table[table["headline"]]
    out = []
    for (protocol, fraction), rows in head.groupby(["protocol", "label_fraction"], sort=False):
        a, b = rows[rows["kind"] == a_kind], rows[rows["kind"] == b_kind]
        if a.empty or b.empty:
            continue
        est = _gap(a, b, correct, n_boot)
        out.append({
            "protocol": protocol, "label_fraction": fraction,
            "a_encoder": a["encoder"].iloc[0], "a_layer": a["layer"].iloc[0], "a_seeds": len(a),
            "b_encoder": b["encoder"].iloc[0], "b_layer": b["layer"].iloc[0], "b_seeds": len(b),
            "a_test_top1": a["test_top1"].mean(), "a_sd": 100 * est.sd_a,
            "b_test_top1": b["test_top1"].mean(), "b_sd": 100 * est.sd_b,
            "gap": 100 * est.value, "gap_ci_low": 100 * est.low, "gap_ci_high": 100 * est.high,
        })  # fmt: skip
    return pd.DataFrame(out)


def _gap(a: pd.DataFrame, b: pd.DataFrame, correct: Correctness, n_boot: int) -> Estimate:
    ma = [correct(r) for _, r in a.iterrows()]
    mb = [correct(r) for _, r in b.iterrows()]
    if all(m is not None for m in ma + mb) and len({len(m) for m in ma + mb}) == 1:
        return bootstrap_gap(np.stack(ma), np.stack(mb), n_boot=n_boot)
    pa, pb = a["test_top1"].mean() / 100, b["test_top1"].mean() / 100
    na, nb = int(a["test_n"].iloc[0]), int(b["test_n"].iloc[0])
    low, high = newcombe_diff(round(pa * na), na, round(pb * nb), nb)
    sd = lambda d: float(d["test_top1"].std(ddof=1)) / 100 if len(d) > 1 else 0.0  # noqa: E731
    return Estimate(pa - pb, low, high, sd(a), sd(b), len(a), len(b))
