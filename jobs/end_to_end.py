"""The whole pipeline on one machine, on the embedded default (scikit-learn's digits):

    python -m jobs.end_to_end [--output-root outputs/e2e] [--steps 300] [--trials 4]

1. writes WebDataset shards from the digits (train / val / test),
2. pretrains a context encoder with Ray Train (2 DDP workers), tracked in MLflow,
3. runs a small Ray Tune search over the loss weights, learning rates and mask type,
4. probes the pretrained and the best searched encoder against random init and raw pixels,
5. prints the results table and the `mlflow ui` command that shows every run.

Steps 2-3 (`select_encoders`) read the train and val shards only: every choice is made on val.
The test shards are read once, by the probe in step 4 (`score`), to score.

Every step is the same library call the individual jobs make (`jobs.make_shards`,
`pipeline.pretrain.run_pretrain`, `pipeline.search.run_search`, `evaluation.run.run_probe`);
nothing here is a second copy of their logic.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"


def _stage(msg: str, t0: float) -> None:
    print(f"\n=== [{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Splits:
    """Shard patterns of the digits' train / val / test splits."""

    train: str
    val: str
    test: str


@dataclass(frozen=True)
class Selected:
    """What the selection stage chose (on val) for the scoring stage."""

    pretrained_uri: str
    tune_best_uri: str
    tracking_uri: str
    pretrain_run_id: str
    checkpoint_path: str | None
    search_run_id: str
    best_config_path: Path


def make_digit_shards(out: Path) -> Splits:
    """Digits shards under `out` (reused when already written)."""
    from jobs import make_shards

    if not (out / "manifest.json").is_file():
        make_shards.main(["--src", "digits", "--out", str(out)])
    return Splits(*(str(out / f"digits-{split}-*.tar") for split in ("train", "val", "test")))


def pretrain(root: Path, train: str, val: str, steps: int, stamp: str):
    from pipeline.config import load_config
    from pipeline.pretrain import run_pretrain

    cfg = load_config(CONFIGS / "digits.yaml", [
        f"data.train_shards={train}", f"data.val_shards={val}", f"run.output_root={root}",
        f"train.max_steps={steps}", f"train.checkpoint_every={max(1, steps // 3)}",
        f"train.sample_every={max(1, steps // 3)}", f"run.run_name=digits-{stamp}",
    ])  # fmt: skip
    return run_pretrain(cfg)


def search(root: Path, train: str, val: str, steps: int, trials: int, stamp: str):
    from pipeline.config import apply_overrides
    from pipeline.search import load_settings, run_search

    settings, base = load_settings(CONFIGS / "tune_digits.yaml", [
        f"num_samples={trials}", f"name=tune-digits-{stamp}",
    ])  # fmt: skip
    base = apply_overrides(base, [
        f"data.train_shards={train}", f"data.val_shards={val}", f"run.output_root={root}",
        f"train.max_steps={steps}", f"train.checkpoint_every={max(1, steps // 3)}",
    ])  # fmt: skip
    return run_search(settings, base)


def select_encoders(root: Path, splits: Splits, args: argparse.Namespace, stamp: str,
                    t0: float) -> Selected:  # fmt: skip
    """Steps 2-3: pretrain, then search, choosing on the val split. Never reads splits.test."""
    from pipeline.search.trial import best_trial_encoder

    _stage(f"2/4 pretraining with Ray Train, 2 workers, {args.steps} steps", t0)
    pre = pretrain(root, splits.train, splits.val, args.steps, stamp)
    _stage(f"3/4 Ray Tune search, {args.trials} trials of {args.trial_steps} steps", t0)
    found = search(root, splits.train, splits.val, args.trial_steps, args.trials, stamp)
    ranked = [str(t) for t in found.table["trial_id"]]  # the table is sorted best first
    return Selected(
        pretrained_uri=f"runs:/{pre.mlflow_run_id}/encoder/generator.pt",
        tune_best_uri=best_trial_encoder(found.tracking_uri, found.parent_run_id, ranked),
        tracking_uri=pre.tracking_uri,
        pretrain_run_id=pre.mlflow_run_id,
        checkpoint_path=pre.checkpoint_path,
        search_run_id=found.parent_run_id,
        best_config_path=found.best_config_path,
    )


def score(root: Path, splits: Splits, chosen: Selected, layers: str, t0: float) -> str:
    """Step 4: the probe, the only reader of the test split. Returns its MLflow run id."""
    import logging

    from evaluation.run import ProbeRunConfig, run_probe

    _stage("4/4 linear probes and kNN on frozen features vs random init and raw pixels", t0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    res = run_probe(ProbeRunConfig(
        encoders={"pretrained": chosen.pretrained_uri, "tune_best": chosen.tune_best_uri},
        train_shards=splits.train, test_shards=splits.test, image_size=32,
        output_root=str(root), tracking_uri=chosen.tracking_uri, experiment="digits-probe",
        inpaint_images=0, layers=layers,
    ))  # fmt: skip
    print(res.summary())
    return res.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output-root", default="outputs/e2e")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--trials", type=int, default=4, help="Tune trials")
    p.add_argument("--trial-steps", type=int, default=90, help="steps per Tune trial")
    p.add_argument("--layers", default="conv2,conv3,bottleneck", help="encoder layers to probe")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Runs the pipeline; returns the probe's MLflow run id."""
    args = parse_args(argv)
    from pipeline.runtime import connect_ray

    t0 = time.perf_counter()
    root = Path(args.output_root).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    _stage(f"1/4 shards from scikit-learn's digits -> {root / 'shards'}", t0)
    splits = make_digit_shards(root / "shards" / "digits")
    print(connect_ray(num_cpus=2))
    chosen = select_encoders(root, splits, args, stamp, t0)
    probe_run = score(root, splits, chosen, args.layers, t0)

    _stage("done", t0)
    print(f"pretrain run:  {chosen.pretrain_run_id}  (checkpoint {chosen.checkpoint_path})")
    print(f"tune search:   {chosen.search_run_id}  (best config {chosen.best_config_path})")
    print("see every run: mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri "
          f"{chosen.tracking_uri}")  # fmt: skip
    return probe_run


if __name__ == "__main__":
    main()
