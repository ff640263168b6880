"""Ray Train overhead: the same training steps in-process vs. through Ray Train.

    python benchmarks/bench_ray_overhead.py [--steps 60] [--shards PATTERN]

Rows, all in one run on the same data and config (32-px CIFAR-10 centre setting):
  in-process   pipeline.trainer.fit in this process, 1 torch thread
  ray 1 worker the same loop as a Ray Train worker with 1 CPU
  ray 2 workers DDP over 2 workers with 1 CPU each (gloo all-reduce every step)
Steady-state images/s is the median of the per-log-interval rates after the first interval (the
warm-up); wall time includes Ray worker start-up, reported separately. Target: Ray with one
worker within 5 % of in-process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import describe
from pipeline.config import load_config
from pipeline.runtime import start_local_ray

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10" / "cifar10-train-{000000..000001}.tar"


def overrides(shards: str, steps: int, out: str, workers: int) -> list[str]:
    return [
        f"data.train_shards={shards}", "data.val_shards=", "data.image_size=32",
        "model.image_size=32", "model.width=32", "model.bottleneck=256", "data.batch_size=32",
        f"train.max_steps={steps}", "train.log_every=10", f"train.checkpoint_every={steps}",
        "train.eval_batches=0", f"run.output_root={out}", "run.name=bench-ray",
        f"run.num_workers={workers}", "run.cpus_per_worker=1", "run.max_failures=0",
    ]  # fmt: skip


def in_process(cfg) -> tuple[float, float]:
    from pipeline.data import build_loader
    from pipeline.trainer import Trainer, fit

    torch.set_num_threads(1)
    rates: list[float] = []
    trainer = Trainer(cfg)

    def loader(epoch: int, start: int):
        return build_loader(cfg.data, cfg.mask, urls=cfg.data.train_shards, train=True,
                            epoch=epoch, seed=cfg.train.seed, start_batch=start)  # fmt: skip

    t0 = time.perf_counter()
    fit(trainer, loader, on_log=lambda m: rates.append(m["images_per_s"]))
    return statistics.median(rates[1:]), time.perf_counter() - t0


def through_ray(cfg, name: str) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from pipeline.config import tracking_uri
    from pipeline.ray_train import build_trainer
    from pipeline.tracking import start_or_resume_run

    uri = tracking_uri(cfg.run)
    run_id, _ = start_or_resume_run(uri, cfg.run.name, name)
    t0 = time.perf_counter()
    build_trainer(cfg, run_name=name, tracking_uri=uri, mlflow_run_id=run_id).fit()
    wall = time.perf_counter() - t0
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    # rank 0's rate; with DDP every rank steps together, so the job's rate is world x that.
    return statistics.median(rates[1:]) * cfg.run.num_workers, wall


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--shards", default=str(CIFAR))
    args = p.parse_args()

    import ray

    start_local_ray(2, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for label, workers in (("in-process", 0), ("ray 1 worker", 1), ("ray 2 workers", 2)):
            cfg = load_config(None, overrides(args.shards, args.steps, out, max(1, workers)))
            rate, wall = in_process(cfg) if workers == 0 else through_ray(cfg, f"w{workers}")
            rows.append((label, rate, wall))
    ray.shutdown()

    base = rows[0][1]
    print(f"\nRay Train overhead — {describe()}")
    print(f"{args.steps} steps, batch 32 per worker, 32-px CIFAR-10 (width 32, bottleneck 256)")
    print(f"{'setting':<16}{'images/s':>10}{'vs in-process':>15}{'wall s (incl. start)':>22}")
    for label, rate, wall in rows:
        print(f"{label:<16}{rate:>10.1f}{rate / base:>14.2f}x{wall:>22.1f}")
    overhead = 1 - rows[1][1] / base
    verdict = "meets" if overhead <= 0.05 else "misses"
    print(f"\nRay 1-worker overhead: {overhead * 100:+.1f} % ({verdict} the <= 5 % target)")


if __name__ == "__main__":
    main()
