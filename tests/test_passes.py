"""pipeline.passes: the first N batches of a stream, and eval mode restored after a pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.passes import eval_mode, take_batches


def stream(sizes: list[int], pulled: list[int], invalid_last: int = 0):
    """Batches of the given sizes; records each index as it is pulled."""
    for i, n in enumerate(sizes):
        pulled.append(i)
        valid = torch.ones(n, dtype=torch.bool)
        if invalid_last:
            valid[n - invalid_last :] = False
        yield {"image": torch.zeros(n, 3, 2, 2), "valid": valid, "i": i}


@pytest.mark.parametrize(
    "n_batches, n_images, want",
    [
        (2, None, [0, 1]),
        (None, None, [0, 1, 2, 3]),
        (None, 5, [0, 1]),  # 4 + 4 >= 5: the batch that crosses is included
        (None, 4, [0]),
        (None, 0, [0]),  # the check follows each batch, as the loops it replaces did
        (3, 100, [0, 1, 2]),  # whichever cap comes first
        (0, None, []),
    ],
)
def test_take_batches_caps_and_never_pulls_past_the_last(n_batches, n_images, want):
    pulled: list[int] = []
    got = take_batches(stream([4, 4, 4, 4], pulled), n_batches=n_batches, n_images=n_images)
    assert [b["i"] for b in got] == want
    assert pulled == want  # no batch decoded only to be dropped


def test_take_batches_counts_valid_rows_only():
    pulled: list[int] = []
    got = list(take_batches(stream([4, 4, 4], pulled, invalid_last=2), n_images=5))
    assert [b["i"] for b in got] == [0, 1, 2]  # 2 valid images a batch
    no_valid = [{"image": torch.zeros(3, 3, 2, 2)} for _ in range(3)]
    assert len(list(take_batches(no_valid, n_images=4))) == 2  # every row counts


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_previous_mode_even_on_error(training):
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout())
    net.train(training)
    with eval_mode(net) as m:
        assert m is net and not any(x.training for x in net.modules())
    assert all(x.training == training for x in net.modules())
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert all(x.training == training for x in net.modules())
