"""README's CIFAR-10 tables are generated from benchmarks/results (`evaluation.bench_readme`):
the committed README must be what the committed files say, and the generator must mark the
val-chosen rows and the targets from the numbers, not from anything else."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from evaluation.bench_readme import BEGIN, END, main, replace_section, section

ROOT = Path(__file__).resolve().parents[1]


def test_readme_section_is_what_the_committed_results_say(capsys):
    rc = main(["--readme", str(ROOT / "README.md"), "--results", str(ROOT / "benchmarks/results"),
               "--check"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err


def _write(tmp: Path, gap: float, gap_low: float, ce_full: float) -> Path:
    rows = []
    for kind, enc, layers in [("context_encoder", "ce", ("conv1", "conv2")),
                              ("random_init", "random_init", ("conv1", "conv2"))]:  # fmt: skip
        for f in (0.1, 1.0):
            for seed in (0, 1):
                for i, layer in enumerate(layers):
                    rows.append({
                        "encoder": enc, "kind": kind, "protocol": "gap", "label_fraction": f,
                        "seed": seed, "layer": layer, "chosen_on_val": layer == "conv2",
                        "val_top1": 50.0 + i + seed, "test_top1": 40.0 + 10 * i,
                        "test_ci_low": 0, "test_ci_high": 0, "headline": layer == "conv2",
                        "C": 0.01, "C_at_edge": i == 0 and f == 1, "converged": True,
                        "feature_dim": 9, "n_train": round(f * 2000), "n_val": 200,
                        "val_method": "carve",
                    })  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp / "cifar10.csv", index=False)
    head = [
        {"kind": k, "protocol": "gap", "label_fraction": f, "encoder": e, "layer": "conv2",
         "seeds": 2, "val_top1": 51.0, "test_top1": top, "test_sd": 0.5, "ci_low": top - 1,
         "ci_high": top + 1}
        for f in (0.1, 1.0)
        for k, e, top in [("context_encoder", "ce", ce_full if f == 1 else 50.0),
                          ("random_init", "random_init", 45.0)]
    ]  # fmt: skip
    pd.DataFrame(head).to_csv(tmp / "cifar10_headline.csv", index=False)
    pd.DataFrame([
        {"protocol": "gap", "label_fraction": f, "gap": gap, "gap_ci_low": gap_low,
         "gap_ci_high": gap + 2}
        for f in (0.1, 1.0)
    ]).to_csv(tmp / "cifar10_gap.csv", index=False)  # fmt: skip
    (tmp / "cifar10_summary.md").write_text("| table |\n\nMachine: a test box, 2 cores.\n")
    return tmp


@pytest.mark.parametrize(
    ("gap", "low", "ce_full", "gap_hit", "top_hit"),
    [(10.5, 5.5, 65.2, "yes", "yes"), (10.5, 4.9, 64.9, "no", "no"), (9.9, 8.0, 70.0, "no", "yes")],
)
def test_targets_follow_the_numbers(tmp_path, gap, low, ce_full, gap_hit, top_hit):
    md = section(_write(tmp_path, gap, low, ce_full))
    line = next(x for x in md.splitlines() if x.startswith("| gap | 100% (2,000)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-2:] == [gap_hit, top_hit]
    assert f"**{gap:+.1f}** [{low:+.1f}," in line and f"**{ce_full:.1f}** ± 0.5" in line
    # 65 % is judged at full labels only.
    ten = next(x for x in md.splitlines() if x.startswith("| gap | 10% (200)"))
    assert ten.rstrip(" |").endswith("–")
    assert "Machine: a test box" in md and "8 probe rows" not in md and "16 probe rows" in md
    assert "4 with C still at the grid's edge" in md  # conv1 at 100 %, 2 x 2 seeds


def test_every_layer_row_bolds_only_the_val_chosen_layer(tmp_path):
    md = section(_write(tmp_path, 6.0, 4.0, 60.0)).splitlines()
    conv1 = next(x for x in md if x.startswith("| ce / conv1 (2)"))
    conv2 = next(x for x in md if x.startswith("| ce / conv2 (2)"))
    # val mean over seeds 0, 1: conv1 50.5, conv2 51.5; test 40 / 50.
    assert "50.5 → 40.0" in conv1 and "**" not in conv1
    assert conv2.count("**51.5 → 50.0**") == 2


def test_replace_section_keeps_the_prose_and_needs_the_markers():
    readme = f"intro\n{BEGIN}\nold numbers\n{END}\nlevers prose\n"
    assert replace_section(readme, "new") == f"intro\n{BEGIN}\nnew\n{END}\nlevers prose\n"
    with pytest.raises(ValueError, match="no"):
        replace_section("intro only\n", "new")
