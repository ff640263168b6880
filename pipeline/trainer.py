"""Single-process Context Encoder trainer: D step, then G step, on one batch at a time.

Knows nothing of Ray or MLflow: metrics leave through callbacks given to `fit`, and a `wrap`
callable (Ray's `prepare_model`, or DDP) is applied to the networks by the caller's choice.
One generator forward per step feeds both updates, as in the released code: D learns from
its detached output, then G is pushed through the freshly updated D.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.config import Config, ModelConfig, from_dict, generator_lr, to_dict
from pipeline.model import Discriminator, Generator, build_discriminator, build_generator
from pipeline.objective import (
    discriminator_fake_loss,
    discriminator_input,
    discriminator_real_loss,
    generator_loss,
    region,
)
from pipeline.passes import eval_mode, take_batches
from pipeline.precision import Resolved, resolve_for

Batch = dict[str, Any]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _adam(params: Iterable[Tensor], lr: float, cfg: Config, device: torch.device):
    """Adam with beta1 = 0.5; the fused kernel (CPU and CUDA) updates all tensors in one pass."""
    fused = device.type in ("cpu", "cuda")
    betas = (cfg.train.beta1, cfg.train.beta2)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused)


class Trainer:
    """Holds G, D (None when lambda_adv == 0), both optimisers and the position in the run.

    `self.g` / `self.d` are the raw modules (after the optional SyncBatchNorm conversion);
    `self.g_model` / `self.d_model` are what `wrap` returned (DDP): they run the forwards whose
    gradients must be all-reduced."""

    def __init__(
        self,
        cfg: Config,
        device: str | torch.device = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.cfg, self.device = cfg, torch.device(device)
        # What train.precision / channels_last ("auto" or explicit) mean on this device.
        self.resolved: Resolved = resolve_for(
            cfg.train.precision, cfg.train.channels_last, self.device
        )
        self.centre = not cfg.model.full_image_output
        self.d_input = cfg.loss.discriminator_input  # what D judges (random masks)
        self.step = self.epoch = self.batch_in_epoch = 0
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank and every run
        self.g: Generator = self._prepare(build_generator(cfg.model))
        self.d: Discriminator | None = None
        if cfg.loss.lambda_adv > 0:  # lambda_adv == 0 builds no discriminator at all
            self.d = self._prepare(build_discriminator(cfg.model))
        self.g_model = wrap(self.g) if wrap else self.g
        self.d_model = wrap(self.d) if wrap and self.d is not None else self.d
        self.opt_g = _adam(self.g.parameters(), generator_lr(cfg.train, cfg.loss), cfg, self.device)
        self.opt_d = (
            _adam(self.d.parameters(), cfg.train.lr_d, cfg, self.device) if self.d else None
        )
        compile_ = torch.compile if cfg.train.compile else (lambda m: m)
        self._g_fwd = compile_(self.g_model)
        self._d_fwd = compile_(self.d_model) if self.d is not None else None
        self._d_raw = compile_(self.d) if self.d is not None else None

    def _prepare(self, module: nn.Module) -> nn.Module:
        # PyTorch's SyncBatchNorm runs on CUDA only; CPU ranks keep per-rank statistics.
        if _distributed() and self.cfg.train.sync_bn and self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module = module.to(self.device)
        if self.resolved.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module.train()

    def _autocast(self) -> contextlib.AbstractContextManager:
        bf16 = self.resolved.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _tensor(self, batch: Batch, key: str) -> Tensor:
        if key not in batch:
            raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)})")
        fmt = torch.channels_last if self.resolved.channels_last else torch.contiguous_format
        return batch[key].to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One D update (if any), then one G update. Returns the loss parts as floats:
        loss_g, loss_rec (+ loss_adv, loss_d, loss_d_real, loss_d_fake, d_x, d_g_z with a D).
        Raises FloatingPointError naming the step and the part when a loss is not finite."""
        image, inp = self._tensor(batch, "image"), self._tensor(batch, "input")
        target, mask = (
            region(image, self.cfg.model),
            region(self._tensor(batch, "mask"), self.cfg.model),
        )
        with self._autocast():
            pred = self._g_fwd(inp)  # (B, 3, T, T)
        parts: dict[str, Tensor] = {}
        if self.d is not None:
            fake = discriminator_input(pred.detach(), target, mask, self.centre, self.d_input)
            parts.update(self._d_step(target, fake))
        parts.update(self._g_step(pred, target, mask))
        self.step += 1
        return self._finite(parts)

    def _d_step(self, target: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Forward + backward per half: two DDP forwards before one backward would re-broadcast
        BN buffers that the first graph saved. no_sync defers the all-reduce to the fake half."""
        self.opt_d.zero_grad(set_to_none=True)
        no_sync = getattr(self.d_model, "no_sync", contextlib.nullcontext)
        with no_sync():
            with self._autocast():
                real = discriminator_real_loss(self._d_fwd(target))
            real["loss_d_real"].backward()
        with self._autocast():
            fake_parts = discriminator_fake_loss(self._d_fwd(fake))
        fake_parts["loss_d_fake"].backward()
        self.opt_d.step()
        out = {**real, **fake_parts}
        out["loss_d"] = (out["loss_d_real"] + out["loss_d_fake"]).detach()
        return out

    def _g_step(self, pred: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """G update through the raw D with its params frozen: no D grads, and no DDP hooks
        of the wrapped D firing outside its own step."""
        logits = None
        if self.d is not None:
            self.d.requires_grad_(False)
            fake = discriminator_input(pred, target, mask, self.centre, self.d_input)
            with self._autocast():
                logits = self._d_raw(fake)
        try:
            parts = generator_loss(pred, target, mask, self.cfg.loss, self.centre, logits)
            self.opt_g.zero_grad(set_to_none=True)
            parts["loss_g"].backward()
            self.opt_g.step()
        finally:
            if self.d is not None:
                self.d.requires_grad_(True)
        return parts

    def _finite(self, parts: dict[str, Tensor]) -> dict[str, float]:
        values = torch.stack([v.detach().float() for v in parts.values()]).tolist()  # one sync
        out = dict(zip(parts, values, strict=True))
        bad = [k for k, v in out.items() if not np.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"non-finite loss at step {self.step}: "
                + ", ".join(f"{k}={out[k]}" for k in bad)
                + " (lower the learning rates or check the input batch)"
            )
        return out

    # ---- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Held-out masked L2 in [-1, 1] units over the dropped pixels (mask == 1) of valid
        samples: "val_rec_l2" for the inpainted image, "val_fill_l2" for the mean-colour fill
        (the input itself), "val_images" the count. G runs in eval mode (BN running stats)."""
        sums = torch.zeros(3, dtype=torch.float64)  # rec, fill, dropped values
        images = 0
        with eval_mode(self.g):
            for batch in batches:
                with self._autocast():
                    out = inpaint(self.g, batch, self.cfg.model).float().cpu()
                keep = batch.get("valid", torch.ones(len(batch["image"]), dtype=torch.bool))
                m = batch["mask"][keep].float()
                img, inp = batch["image"][keep], batch["input"][keep]
                sums += torch.stack(
                    [
                        (m * (out[keep] - img).square()).sum(),
                        (m * (inp - img).square()).sum(),
                        m.sum() * img.shape[1],
                    ]
                ).double()
                images += int(keep.sum())
        if sums[2] == 0:
            raise ValueError("evaluate: no dropped pixels in the given batches (empty split?)")
        return {
            "val_rec_l2": float(sums[0] / sums[2]),
            "val_fill_l2": float(sums[1] / sums[2]),
            "val_images": float(images),
        }

    # ---- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue the run exactly (see pipeline.checkpoint for the layout)."""
        return {
            "generator": self.g.state_dict(),
            "discriminator": self.d.state_dict() if self.d is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "config": to_dict(self.cfg),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; the model config must match this trainer's."""
        saved = from_dict(state["config"])
        if saved.model != self.cfg.model or (state["discriminator"] is None) != (self.d is None):
            raise ValueError(
                f"checkpoint architecture {saved.model} (lambda_adv={saved.loss.lambda_adv}) "
                f"does not match this trainer's {self.cfg.model} "
                f"(lambda_adv={self.cfg.loss.lambda_adv})"
            )
        self.g.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.d is not None:
            self.d.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states as tensors and lists (weights_only-safe)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@torch.no_grad()
def inpaint(g: Generator, batch: Batch, model: ModelConfig) -> Tensor:
    """(B, 3, S, S) in [-1, 1]: the input with G's prediction pasted where mask == 1 (centre:
    the predicted square's interior; the visible ring stays real). Runs on G's device in G's
    current mode; callers wanting BN running statistics call g.eval() first."""
    device = next(g.parameters()).device
    inp, mask = batch["input"].to(device), batch["mask"].to(device)
    pred = g(inp).to(inp.dtype)  # (B, 3, T, T)
    if model.full_image_output:
        full = pred
    else:
        full = inp.clone()
        region(full, model).copy_(pred)
    return torch.lerp(inp, full, mask)  # input where mask == 0, prediction where mask == 1


def _batch_len(batch: Batch) -> int:
    return int(batch["image"].shape[0])


def _skipped(batch: Batch) -> int:
    return int(batch.get("skipped", 0))


def fit(
    trainer: Trainer,
    loader_for_epoch: Callable[[int, int], Iterable[Batch]],
    *,
    on_log: Callable[[dict[str, float]], None] = lambda m: None,
    on_checkpoint: Callable[[Trainer], None] = lambda t: None,
) -> Trainer:
    """Train until trainer.step == cfg.train.max_steps, resuming at (epoch, batch_in_epoch).

    loader_for_epoch(epoch, start_batch) returns the rest of that epoch: len() is the number of
    batches it yields from start_batch on (pipeline.data.build_loader: steps - start_batch).

    on_log gets the train_step dict + "step", "epoch", "images_per_s", "skipped",
    "data_wait_s" (mean seconds a step waited for its batch) and "data_wait_frac" (that wait's
    share of the step: wait / (wait + train_step)) every train.log_every steps; on_checkpoint
    gets the trainer every train.checkpoint_every steps and once at the end. Called on every
    rank: the caller decides what rank 0 writes."""
    meter = _Meter()
    last_ckpt = trainer.step
    while trainer.step < trainer.cfg.train.max_steps:
        loader = loader_for_epoch(trainer.epoch, trainer.batch_in_epoch)
        remaining = len(loader)  # type: ignore[arg-type]
        if remaining <= 0:
            raise ValueError(
                f"loader for epoch {trainer.epoch} from batch {trainer.batch_in_epoch} has "
                f"{remaining} batches"
            )
        last_ckpt = _run_epoch(trainer, loader, remaining, meter, on_log, on_checkpoint, last_ckpt)
    if last_ckpt != trainer.step:
        on_checkpoint(trainer)
    return trainer


def _run_epoch(
    trainer: Trainer,
    loader: Iterable[Batch],
    remaining: int,
    meter: _Meter,
    on_log: Callable[[dict[str, float]], None],
    on_checkpoint: Callable[[Trainer], None],
    last_ckpt: int,
) -> int:
    """Steps through the rest of one epoch (or to max_steps); returns the last checkpoint step.
    The epoch rolls over right after its last batch, so a checkpoint taken there resumes at
    the next epoch rather than at an empty tail."""
    tc, ran = trainer.cfg.train, 0
    # At most `remaining`: a loader longer than its len() must not shift epoch boundaries.
    for wait_s, batch in _timed(take_batches(loader, n_batches=remaining)):
        ran += 1
        t0 = time.perf_counter()
        metrics = trainer.train_step(batch)
        meter.add(_batch_len(batch), _skipped(batch), wait_s, time.perf_counter() - t0)
        trainer.batch_in_epoch += 1
        if ran == remaining:
            trainer.epoch, trainer.batch_in_epoch = trainer.epoch + 1, 0
        if trainer.step % tc.log_every == 0:
            on_log({**metrics, **meter.flush(trainer)})
        if trainer.step % tc.checkpoint_every == 0:
            on_checkpoint(trainer)
            last_ckpt = trainer.step
        if trainer.step >= tc.max_steps:
            return last_ckpt
    if ran == 0:
        raise ValueError(f"loader for epoch {trainer.epoch} yielded no batches")
    if ran < remaining:  # the loader ran dry before its len(): close the epoch anyway
        trainer.epoch, trainer.batch_in_epoch = trainer.epoch + 1, 0
    return last_ckpt


def _timed(batches: Iterable[Batch]) -> Iterator[tuple[float, Batch]]:
    """(seconds this process waited for the batch, batch): the time the loader's next() took,
    i.e. how long decoding (or its prefetch running dry) held the step up. On rank 0 under
    DDP this is rank 0's own wait; a slower rank's wait shows as rank 0's step time instead."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield time.perf_counter() - t0, batch


class _Meter:
    """Images/s, skipped-sample count and data wait since the last log."""

    def __init__(self):
        self.t0, self.images, self.skipped = time.perf_counter(), 0, 0
        self.steps, self.wait_s, self.step_s = 0, 0.0, 0.0

    def add(self, images: int, skipped: int, wait_s: float = 0.0, compute_s: float = 0.0) -> None:
        self.images += images
        self.skipped += skipped
        self.steps += 1
        self.wait_s += wait_s
        self.step_s += wait_s + compute_s

    def flush(self, trainer: Trainer) -> dict[str, float]:
        now = time.perf_counter()
        out = {
            "step": float(trainer.step),
            "epoch": float(trainer.epoch),
            "images_per_s": self.images / max(now - self.t0, 1e-9),
            "skipped": float(self.skipped),
            "data_wait_s": self.wait_s / max(self.steps, 1),
            "data_wait_frac": self.wait_s / self.step_s if self.step_s > 0 else 0.0,
        }
        self.t0, self.images, self.skipped = now, 0, 0
        self.steps, self.wait_s, self.step_s = 0, 0.0, 0.0
        return out
