"""The whole pipeline on one machine, on the embedded default (scikit-learn's digits):

    ce-end-to-end [--output-root outputs/e2e] [--steps 300] [--trials 4]
    (or: python -m jobs.end_to_end ...)

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
from typing import TYPE_CHECKING

from jobs._cli import Work, prog_name, run_cli, run_main
from pipeline.storage import is_uri

if TYPE_CHECKING:
    from pipeline.pretrain import PretrainResult
    from pipeline.search import SearchResult

CONFIGS = Path(__file__).resolve().parent / "configs"
PROG = ("ce-end-to-end", "jobs.end_to_end")


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

    pretrained: PretrainResult
    search: SearchResult
    tune_best_uri: str  # the encoder of the best search trial that finished

    @property
    def best_config_path(self) -> Path:
        return self.search.best_config_path


def make_digit_shards(out: Path) -> Splits:
    """Digits shards under `out` (reused when already written)."""
    from jobs import make_shards

    if not (out / "manifest.json").is_file():
        make_shards.main(["--src", "digits", "--out", str(out)])
    return Splits(*(str(out / f"digits-{split}-*.tar") for split in ("train", "val", "test")))


def _budget(root: Path, splits: Splits, steps: int) -> list[str]:
    """Overrides for train / val shards, output root and steps: never the test shards."""
    return [f"data.train_shards={splits.train}", f"data.val_shards={splits.val}",
            f"run.output_root={root}", f"train.max_steps={steps}",
            f"train.checkpoint_every={max(1, steps // 3)}"]  # fmt: skip


def select_encoders(root: Path, splits: Splits, args: argparse.Namespace, stamp: str,
                    t0: float) -> Selected:  # fmt: skip
    """Steps 2-3: pretrain, then search, choosing on the val split. Never reads splits.test."""
    from pipeline.config import apply_overrides, load_config
    from pipeline.pretrain import run_pretrain
    from pipeline.search import load_settings, run_search
    from pipeline.search.trial import best_trial_encoder

    _stage(f"2/4 pretraining with Ray Train, 2 workers, {args.steps} steps", t0)
    pre = run_pretrain(load_config(CONFIGS / "digits.yaml", _budget(root, splits, args.steps) + [
        f"train.sample_every={max(1, args.steps // 3)}", f"run.run_name=digits-{stamp}",
    ]))  # fmt: skip
    _stage(f"3/4 Ray Tune search, {args.trials} trials of {args.trial_steps} steps", t0)
    settings, base = load_settings(
        CONFIGS / "tune_digits.yaml", [f"num_samples={args.trials}", f"name=tune-digits-{stamp}"]
    )
    found = run_search(settings, apply_overrides(base, _budget(root, splits, args.trial_steps)))
    ranked = [str(t) for t in found.table["trial_id"]]  # the table is sorted best first
    best = best_trial_encoder(found.tracking_uri, found.parent_run_id, ranked)
    return Selected(pre, found, best)


def score(root: Path, splits: Splits, chosen: Selected, layers: str, t0: float) -> str:
    """Step 4: the probe, the only reader of the test split. Returns its MLflow run id."""
    import logging

    from evaluation.run import ProbeRunConfig, run_probe

    _stage("4/4 linear probes and kNN on frozen features vs random init and raw pixels", t0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pretrained = f"runs:/{chosen.pretrained.mlflow_run_id}/encoder/generator.pt"
    res = run_probe(ProbeRunConfig(
        encoders={"pretrained": pretrained, "tune_best": chosen.tune_best_uri},
        train_shards=splits.train, test_shards=splits.test, image_size=32,
        output_root=str(root), tracking_uri=chosen.pretrained.tracking_uri,
        experiment="digits-probe", inpaint_images=0, layers=layers,
    ))  # fmt: skip
    print(res.summary())
    return res.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name(*PROG), description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    p.add_argument("--output-root", default="outputs/e2e", help="a local folder")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--trials", type=int, default=4, help="Tune trials")
    p.add_argument("--trial-steps", type=int, default=90, help="steps per Tune trial")
    p.add_argument("--layers", default="conv2,conv3,bottleneck", help="encoder layers to probe")
    return p.parse_args(argv)


def prepare(argv: list[str] | None = None) -> Work:
    """Parse and check the flags; returns the pipeline to run."""
    args = parse_args(argv)
    small = [f"--{k.replace('_', '-')}" for k in ("steps", "trials", "trial_steps")
             if getattr(args, k) < 1]  # fmt: skip
    if small:
        raise ValueError(f"{', '.join(small)} must be >= 1")
    if is_uri(args.output_root):
        # The laptop demo keeps its shards and sqlite MLflow store on local disk; the jobs it
        # chains take object-storage roots one by one (docs/object_storage.md).
        raise ValueError(f"--output-root must be a local folder, got {args.output_root}")
    return lambda: run_all(args)


def main(argv: list[str] | None = None) -> str:
    """Runs the pipeline, every exception raised; returns the probe's MLflow run id."""
    return run_main(prepare, argv)


def cli(argv: list[str] | None = None) -> None:
    """The `ce-end-to-end` console script: exit 2 with one line on a usage error."""
    run_cli(prog_name(*PROG), prepare, argv)


def run_all(args: argparse.Namespace) -> str:
    """The four stages; returns the probe's MLflow run id."""
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
    pre, found = chosen.pretrained, chosen.search
    print(f"pretrain run:  {pre.mlflow_run_id}  (checkpoint {pre.checkpoint_path})")
    print(f"tune search:   {found.parent_run_id}  (best config {found.best_config_path})")
    server = pre.tracking_uri.startswith(("http://", "https://"))  # MLFLOW_TRACKING_URI's
    print("see every run: " + (pre.tracking_uri if server else "mlflow ui --host 127.0.0.1 "
          f"--port 5000 --backend-store-uri {pre.tracking_uri}"))  # fmt: skip
    return probe_run


if __name__ == "__main__":
    cli()
