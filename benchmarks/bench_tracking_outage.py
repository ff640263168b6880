"""What a tracking-server outage costs a training loop: wall time of the same trainer loop
(pipeline.trainer.Trainer on synthetic 32 px batches, one RunLogger.metrics call per step and a
sample PNG every 20 steps, as rank 0 logs) with the server up throughout, and with the server
killed for the middle third of the steps (restarted in the background), against no tracking.

    python benchmarks/bench_tracking_outage.py [--steps 300] [--width 16]

Target: the outage row within 10 % of the server-up row. "flush s" is the bounded end flush
(RunLogger.close) that sends what was kept; "steps in MLflow" is checked on the server after it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from machine import describe as machine
from pipeline.config import Config, DataConfig, ModelConfig, TrainConfig
from pipeline.tracking import RunLogger, client, new_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import MlflowServer  # noqa: E402  (the tests' server harness)


def tiny_trainer(width: int):
    from pipeline.trainer import Trainer

    model = ModelConfig(image_size=32, width=width, bottleneck=64)
    cfg = Config(data=DataConfig(image_size=32, batch_size=16), model=model, train=TrainConfig())
    return Trainer(cfg, torch.device("cpu"))


def batch(n: int = 16) -> dict[str, torch.Tensor]:
    image = torch.rand(n, 3, 32, 32) * 2 - 1
    mask = torch.zeros(n, 1, 32, 32)
    mask[..., 9:23, 9:23] = 1
    return {"image": image, "input": image * (1 - mask), "mask": mask}


def loop(trainer, steps: int, logger: RunLogger | None, on_step=lambda s: None) -> float:
    b, grid = batch(), Image.new("RGB", (96, 96))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        on_step(step)
        metrics = trainer.train_step(b)
        if logger is not None:
            logger.metrics(metrics, step=step)
            if step % 20 == 0:
                logger.png(grid, f"samples/step_{step:07d}.png")
    return time.perf_counter() - t0


def tracked(server: MlflowServer, root: Path, name: str, steps: int, width: int, outage: bool):
    run_id = new_run(server.uri, "bench-outage", name)
    logger = RunLogger(server.uri, run_id, spool_dir=root / "spool")
    restarts: list[threading.Thread] = []

    def on_step(step: int) -> None:
        if outage and step == steps // 3:
            server.kill()
        if outage and step == 2 * steps // 3:  # startup takes seconds: in the background
            restarts.append(threading.Thread(target=server.start, daemon=True))
            restarts[0].start()

    seconds = loop(tiny_trainer(width), steps, logger, on_step)
    print(f"[bench] {name}: {steps} steps in {seconds:.1f} s; flushing", flush=True)
    for t in restarts:
        t.join()
    t0 = time.perf_counter()
    line = logger.close(timeout_s=300)
    flush = time.perf_counter() - t0
    keys = {"loss_rec"}
    got = {m.step for k in keys for m in client(server.uri).get_metric_history(run_id, k)}
    return seconds, flush, len(got), line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--width", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    # One thread, as a rank does with cpus_per_worker=1: on a shared machine OpenMP barriers
    # under contention turn a 60 ms step into seconds.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        server = MlflowServer(root)
        server.start()
        print(f"[bench] server up at {server.uri}", flush=True)
        try:
            loop(tiny_trainer(args.width), 20, None)  # warm-up
            base = loop(tiny_trainer(args.width), args.steps, None)
            up = tracked(server, root, "up", args.steps, args.width, outage=False)
            down = tracked(server, root, "outage", args.steps, args.width, outage=True)
        finally:
            server.kill()
    print(f"\n{'run':<34} {'train s':>8} {'x up':>6} {'flush s':>8} {'steps in MLflow':>16}")
    print(f"{'no tracking':<34} {base:8.2f} {base / up[0]:6.2f} {'-':>8} {'-':>16}")
    for name, (sec, flush, n, _) in (("server up", up), ("server down for the middle third", down)):
        print(f"{name:<34} {sec:8.2f} {sec / up[0]:6.2f} {flush:8.2f} {f'{n}/{args.steps}':>16}")
    print(f"\nend lines:\n  {up[3]}\n  {down[3]}")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    main()
