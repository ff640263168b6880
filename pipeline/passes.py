"""A bounded pass of a network over batches: how much of a stream it reads, and which mode the
network runs it in.

    take_batches(loader, n_batches=..., n_images=...)   the first batches of a stream
    with eval_mode(g): ...                                 eval mode for the pass, then restored

Used by the training loop (at most an epoch's planned batches), the held-out set and sample
grids of a run, Tune's kNN score and evaluation's inpainting pass.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn


def take_batches(
    batches: Iterable[dict[str, Any]],
    *,
    n_batches: int | None = None,
    n_images: int | None = None,
) -> Iterator[dict[str, Any]]:
    """The first batches of `batches`: at most `n_batches` (None: no cap), and, with `n_images`,
    up to and including the batch that brings the count of images to `n_images` or more.

    Images are the valid rows (`batch["valid"]`, padding repeats excluded; every row when a
    batch has no "valid"). Nothing past the last batch yielded is pulled from the stream: a
    loader longer than its len() does not decode a batch it will not hand out."""
    it = iter(batches) if n_batches is None else itertools.islice(batches, n_batches)
    return it if n_images is None else _until_images(it, n_images)


def _until_images(batches: Iterator[dict[str, Any]], n_images: int) -> Iterator[dict[str, Any]]:
    seen = 0
    for batch in batches:
        yield batch
        valid = batch.get("valid")
        seen += int(valid.sum()) if valid is not None else len(batch["image"])
        if seen >= n_images:
            return


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (BN running statistics, no dropout) inside the block; its previous
    mode (train or eval) is restored on the way out, exception or not."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
