"""The benchmark's files: the long table (Parquet + CSV), the results CSV, the headline and gap
tables, a markdown summary to paste into README, and the label-efficiency plot.

    python -m evaluation.bench_report outputs/benchmark/cifar10   # rewrite the summary

Fine-tune results enter through `ingest_finetune`: a CSV or Parquet file with one row per
(encoder, seed, label_fraction) and the columns encoder, kind, seed, label_fraction, val_top1,
test_top1 (percent), test_n, optionally layer and test_correct (a .npy of 0/1 per test image in
the probe's test-key order, for a paired gap). They become rows of protocol `finetune`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.intervals import wilson
from evaluation.selection import CONTEXT, PIXELS, RANDOM, VAL_COLUMNS, choose

# benchmarks/results/<name>.csv: these columns, in this order (percent), then the extra ones.
RESULT_COLUMNS = ["encoder", "kind", "protocol", "label_fraction", "seed", "layer", "chosen_on_val",
                  "val_top1", "test_top1", "test_ci_low", "test_ci_high"]  # fmt: skip
EXTRA_COLUMNS = ["headline", "C", "C_at_edge", "converged", "feature_dim", "n_train", "n_val",
                 "val_method"]  # fmt: skip
FINETUNE_NEEDS = ["encoder", "kind", "seed", "label_fraction", "val_top1", "test_top1", "test_n"]
KIND_LABEL = {CONTEXT: "context encoder", RANDOM: "random init", PIXELS: "raw pixels"}


def ingest_finetune(path: str | Path) -> pd.DataFrame:
    """Fine-tune rows (protocol `finetune`) from a CSV/Parquet file; see the module docstring."""
    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if missing := [c for c in FINETUNE_NEEDS if c not in df.columns]:
        raise ValueError(f"fine-tune results {path}: missing columns {missing}")
    df = df.copy()
    df["protocol"] = "finetune"
    df["layer"] = df["layer"] if "layer" in df.columns else "all"
    cis = [wilson(round(t / 100 * n), int(n)) for t, n in zip(df.test_top1, df.test_n, strict=True)]
    df["test_ci_low"] = [100 * lo for lo, _ in cis]
    df["test_ci_high"] = [100 * hi for _, hi in cis]
    if "test_correct" in df.columns:  # relative paths are the results file's
        df["test_correct"] = [str((path.parent / p).resolve()) if isinstance(p, str) and p else ""
                              for p in df["test_correct"]]  # fmt: skip
    return df


def mark_choices(table: pd.DataFrame, min_seeds: int = 1) -> pd.DataFrame:
    """The table with `chosen_on_val` and `headline` set from validation alone (`choose` sees
    only VAL_COLUMNS); a headline encoder needs `min_seeds` seeds where its kind has any."""
    marked = choose(table[VAL_COLUMNS], min_seeds)
    out = table.reset_index(drop=True).copy()
    out["chosen_on_val"] = marked["chosen_on_val"].to_numpy()
    out["headline"] = marked["headline"].to_numpy()
    return out


def results_csv(table: pd.DataFrame, path: Path) -> Path:
    cols = RESULT_COLUMNS + [c for c in EXTRA_COLUMNS if c in table.columns]
    out = table[cols].copy()
    for c in ("val_top1", "test_top1", "test_ci_low", "test_ci_high"):
        out[c] = out[c].astype(float).round(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, index=False)
    return path


def _pct(v: float) -> str:
    return f"{v:.1f}"


def label_text(fraction: float, n_full: int | None) -> str:
    return f"{fraction:.0%}" + (f" ({round(fraction * n_full):,})" if n_full else "")


def summary_markdown(
    head: pd.DataFrame, gap: pd.DataFrame, table: pd.DataFrame, notes: list[str] = ()
) -> str:
    """Headline rows per (protocol, label fraction, kind) and the gap, as markdown tables."""
    n_full = int(table.loc[table.label_fraction == 1, "n_train"].max()) if (
        "n_train" in table and (table.label_fraction == 1).any()) else None  # fmt: skip
    lines = [
        "| protocol | labels | kind | encoder / layer (val-chosen) | seeds | val top-1 "
        "| test top-1 (mean ± sd) | 95 % CI |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    rank = {k: i for i, k in enumerate(KIND_LABEL)}  # context encoder, random init, raw pixels
    head = head.assign(_k=[rank.get(k, len(rank)) for k in head["kind"]])
    head = head.sort_values(["protocol", "label_fraction", "_k"], kind="stable")
    for r in head.itertuples(index=False):
        sd = f" ± {r.test_sd:.1f}" if r.seeds > 1 else ""
        kind, labels = KIND_LABEL.get(r.kind, r.kind), label_text(r.label_fraction, n_full)
        lines.append(
            f"| {r.protocol} | {labels} | {kind} | {r.encoder} / {r.layer} | {r.seeds} "
            f"| {_pct(r.val_top1)} | {_pct(r.test_top1)}{sd} "
            f"| [{_pct(r.ci_low)}, {_pct(r.ci_high)}] |"
        )
    if not gap.empty:
        lines += [
            "",
            "| protocol | labels | context encoder | random init | gap (points) | 95 % CI "
            "| ≥ 10 with CI clear of +5 |",
            "| --- | --- | --- | --- | ---: | --- | --- |",
        ]
        for g in gap.itertuples(index=False):
            hit = "yes" if g.gap >= 10 and g.gap_ci_low > 5 else "no"
            labels = label_text(g.label_fraction, n_full)
            lines.append(
                f"| {g.protocol} | {labels} | {g.a_encoder} / {g.a_layer}: {_pct(g.a_test_top1)} "
                f"| {g.b_layer}: {_pct(g.b_test_top1)} | {g.gap:+.1f} "
                f"| [{g.gap_ci_low:+.1f}, {g.gap_ci_high:+.1f}] | {hit} |"
            )
    at_edge = table.get("C_at_edge", pd.Series(False, index=table.index))
    edge = table[at_edge.fillna(False).astype(bool)]  # ingested rows have no C: NaN
    if not edge.empty:
        lines += ["", f"C still at the grid's edge after the extension in {len(edge)} of "
                  f"{len(table)} rows (marked `C_at_edge` in the CSV)."]  # fmt: skip
    return "\n".join([*lines, *(["", *notes] if notes else [])]) + "\n"


def label_efficiency_plot(table: pd.DataFrame, path: Path) -> Path:
    """Test top-1 against the number of labels: per protocol one panel, per encoder (variant)
    one line through its val-chosen layer at each fraction, mean over seeds with the seeds'
    range as error bars (Wilson's interval for one seed)."""
    from evaluation.report import _pyplot

    plt = _pyplot()
    chosen = table[table["chosen_on_val"] & table["n_train"].notna()]  # probes (with counts)
    protocols = list(dict.fromkeys(chosen["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        sub = chosen[chosen.protocol == protocol]
        for enc, rows in sub.groupby("encoder", sort=False):
            pts = rows.groupby("label_fraction").agg(
                n=("n_train", "max"), top1=("test_top1", "mean"), lo=("test_ci_low", "mean"),
                hi=("test_ci_high", "mean"), smin=("test_top1", "min"), smax=("test_top1", "max"),
                seeds=("seed", "nunique"))  # fmt: skip
            many = pts.seeds > 1
            lo = np.where(many, pts.smin, pts.lo)
            hi = np.where(many, pts.smax, pts.hi)
            ax.errorbar(pts.n, pts.top1, yerr=[pts.top1 - lo, hi - pts.top1], marker="o",
                        capsize=3, label=f"{enc} ({rows.kind.iloc[0]})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"linear probe, protocol {protocol}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="print a benchmark folder's markdown summary")
    p.add_argument("folder", help="<output_root>/benchmark/<name>")
    args = p.parse_args(argv)
    print((Path(args.folder) / "summary.md").read_text(), end="")


if __name__ == "__main__":
    main()
