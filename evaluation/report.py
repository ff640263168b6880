"""The result table (one row per encoder x layer x metric) and its plots.

Plots use matplotlib's Agg backend (no display); the job logs the written files to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["encoder", "layer", "metric", "value"]


def rows_for(encoder: str, layer: str, metrics: dict[str, float]) -> list[dict]:
    return [
        {"encoder": encoder, "layer": layer, "metric": m, "value": float(v)}
        for m, v in metrics.items()
    ]


def make_table(rows: list[dict]) -> pd.DataFrame:
    """The long table, in the order rows were produced."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    if df.duplicated(["encoder", "layer", "metric"]).any():
        dup = df[df.duplicated(["encoder", "layer", "metric"], keep=False)]
        raise ValueError(f"duplicate result rows:\n{dup}")
    return df


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """(encoder, layer) x metric, keeping the encoders' and layers' first-seen order."""
    out = df.pivot(index=["encoder", "layer"], columns="metric", values="value")
    order = df[["encoder", "layer"]].drop_duplicates().itertuples(index=False, name=None)
    metrics = list(dict.fromkeys(df["metric"]))
    return out.reindex(index=pd.MultiIndex.from_tuples(list(order)), columns=metrics)


NOT_CONVERGED_MARK = " (!)"


def unconverged_probes(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(encoder, layer) pairs whose probe solver stopped before converging
    (`probe_converged` == 0), in table order."""
    sub = df[(df["metric"] == "probe_converged") & (df["value"] < 1)]
    return list(dict.fromkeys(sub[["encoder", "layer"]].itertuples(index=False, name=None)))


AT_EDGE_MARK = " (edge)"


def edge_probes(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(encoder, layer) pairs whose chosen C is still at the grid's edge after the extension
    (`probe_C_at_edge` == 1): the optimum may lie beyond it."""
    sub = df[(df["metric"] == "probe_C_at_edge") & (df["value"] >= 1)]
    return list(dict.fromkeys(sub[["encoder", "layer"]].itertuples(index=False, name=None)))


def format_table(df: pd.DataFrame) -> str:
    """A readable fixed-width rendering of `wide(df)`. Layers whose probe did not converge, or
    whose C is still at the grid's edge, are marked in the table and named in a footnote under
    it: their probe numbers are not those of the optimum, and a reader of the table alone must
    not take them for final."""
    w = wide(df)
    bad, edge = unconverged_probes(df), edge_probes(df)
    if bad or edge:
        w.index = pd.MultiIndex.from_tuples([
            (e, lay + (NOT_CONVERGED_MARK if (e, lay) in bad else "")
             + (AT_EDGE_MARK if (e, lay) in edge else ""))
            for e, lay in w.index
        ])  # fmt: skip
    text = w.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")
    if edge:
        names = ", ".join(f"{e}/{lay}" for e, lay in edge)
        text += (f"\n{AT_EDGE_MARK.strip()} chosen C still at the edge of the extended grid "
                 f"(probe_C_at_edge = 1) for {names}: widen --c-grid.")  # fmt: skip
    if bad:
        names = ", ".join(f"{e}/{lay}" for e, lay in bad)
        text += (
            f"\n{NOT_CONVERGED_MARK.strip()} linear probe did not converge (probe_converged = 0) "
            f"for {names}: lbfgs stopped short of its tolerance, so those probe numbers are "
            "not the optimum's; see the log and raise --max-iter."
        )
    return text


def write_table(df: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / "table.parquet", index=False)
    df.to_csv(out / "table.csv", index=False)
    return out / "table.parquet", out / "table.csv"


def best_layer(df: pd.DataFrame, metric: str = "probe_top1") -> tuple[str, str] | None:
    """(encoder, layer) with the highest `metric`; ties go to the first row."""
    sub = df[df["metric"] == metric]
    if sub.empty:
        return None
    row = sub.loc[sub["value"].idxmax()]
    return str(row["encoder"]), str(row["layer"])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window or needs a display
    import matplotlib.pyplot as plt

    return plt


def accuracy_bar_chart(df: pd.DataFrame, path: str | Path, metric: str = "probe_top1") -> Path:
    """Grouped bars: `metric` per layer, one colour per encoder."""
    plt = _pyplot()
    sub = df[df["metric"] == metric]
    encoders = list(dict.fromkeys(sub["encoder"]))
    labels = [f"{e}\n{lay}" for e, lay in sub[["encoder", "layer"]].itertuples(index=False)]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(sub) + 2), 4))
    ax.bar(
        range(len(sub)),
        sub["value"],
        color=[colours(encoders.index(e) % 10) for e in sub["encoder"]],
    )
    ax.set_xticks(range(len(sub)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(f"Linear probe {metric} per encoder and layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def confusion_matrix_plot(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: list[str] | None,
    path: str | Path,
    title: str,
) -> Path:
    """Row-normalised confusion matrix (rows = true class) as a heat map."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    labels = np.unique(np.concatenate([y_true, y_pred]))
    cm = confusion_matrix(y_true, y_pred, labels=labels).astype(float)
    cm /= np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [class_names[i] if class_names else str(i) for i in labels]
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
