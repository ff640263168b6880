"""Masks: shapes, dropped share, fill colour, the visible overlap ring, per-sample variety,
and determinism in (seed, epoch, key) through the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig, MaskConfig
from pipeline.data import build_loader
from pipeline.data.masks import batch_masks, center_mask, fill_masked
from pipeline.data.writer import Source, digits_source, write_shards


@pytest.mark.parametrize(("size", "ring"), [(128, 4), (64, 2), (32, 1)])
def test_center_mask_keeps_the_ring_visible(size: int, ring: int) -> None:
    m = batch_masks(MaskConfig(kind="center"), size, [1, 2, 3])
    assert m.shape == (3, 1, size, size) and m.dtype == np.float32
    assert (m == m[0]).all()  # the centre block is the same for every sample
    t0, t1 = size // 4, size - size // 4  # the predicted centre square
    inner = m[0, 0, t0 + ring : t1 - ring, t0 + ring : t1 - ring]
    assert inner.all() and m[0, 0].sum() == (size // 2 - 2 * ring) ** 2
    target = m[0, 0, t0:t1, t0:t1]
    assert not target[:ring].any() and not target[:, -ring:].any()  # the ring stays visible
    assert center_mask(128, 4).sum() == 56 * 56


@pytest.mark.parametrize("kind", ["random_block", "random_region"])
@pytest.mark.parametrize("size", [32, 128])
def test_random_masks_cover_and_vary(kind: str, size: int) -> None:
    cfg = MaskConfig(kind=kind, min_cover=0.2, max_cover=0.3, max_blocks=4)
    m = batch_masks(cfg, size, list(range(64)))
    cover = m.mean(axis=(1, 2, 3))
    assert m.shape == (64, 1, size, size)
    assert set(np.unique(m).tolist()) == {0.0, 1.0}
    assert (cover >= 0.2).all() and (cover <= 0.3).all()
    assert cover.std() > 0.005  # the share itself is drawn, not fixed
    flat = m.reshape(64, -1)
    assert len({row.tobytes() for row in flat}) == 64  # a different mask per sample
    assert np.array_equal(batch_masks(cfg, size, list(range(64))), m)  # same seeds, same masks


def test_block_count_respects_max_blocks() -> None:
    # With one block allowed every mask is a single filled rectangle.
    m = batch_masks(MaskConfig(kind="random_block", max_blocks=1), 64, list(range(20)))
    for mk in m[:, 0]:
        ys, xs = np.nonzero(mk)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box == mk.sum()


def test_fill_sets_only_dropped_pixels() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    masks = batch_masks(MaskConfig(kind="random_region"), 32, [5, 6, 7, 8])
    out = fill_masked(images, masks, MaskConfig(kind="random_region", fill_rgb=(117, 104, 123)))
    fill = np.array([117, 104, 123], dtype=np.float32) / 255 * 2 - 1
    dropped = np.broadcast_to(masks > 0, out.shape)
    assert np.array_equal(out[~dropped], images[~dropped])
    for c in range(3):
        assert np.allclose(out[:, c][masks[:, 0] > 0], fill[c])


def test_loader_masks_depend_on_seed_epoch_and_key(tmp_path) -> None:
    src = digits_source(32)
    write_shards(
        Source(src.items[:40], src.classes, []),
        tmp_path,
        prefix="m",
        shard_size=20,
        seed=0,
        progress=False,
    )
    urls = str(tmp_path / "m-{000000..000001}.tar")
    mask = MaskConfig(kind="random_block")

    def by_key(workers: int, epoch: int, world: int = 1) -> dict[str, torch.Tensor]:
        out = {}
        for rank in range(world):
            data = DataConfig(image_size=32, batch_size=8, num_workers=workers)
            for b in build_loader(
                data, mask, urls=urls, train=True, epoch=epoch, rank=rank, world_size=world
            ):
                assert torch.equal(
                    b["input"][b["mask"].expand(-1, 3, -1, -1) == 0],
                    b["image"][b["mask"].expand(-1, 3, -1, -1) == 0],
                )
                out.update(zip(b["key"], b["mask"], strict=True))
        return out

    a, b, c = by_key(0, 0), by_key(0, 0, world=3), by_key(0, 1)
    assert a.keys() == b.keys() == c.keys() and len(a) == 40
    assert all(torch.equal(a[k], b[k]) for k in a)  # rank layout does not change a mask
    assert sum(not torch.equal(a[k], c[k]) for k in a) > 30  # a new epoch draws new masks


@pytest.mark.parametrize("kind", ["random_block", "random_region"])
def test_a_mask_depends_on_its_seed_alone(kind: str) -> None:
    # Vectorised over the batch, yet a sample's mask must not depend on its batch-mates.
    cfg = MaskConfig(kind=kind)
    seeds = [3, 2**64 - 1, 0, 12345678901234567890, 7]
    whole = batch_masks(cfg, 32, seeds)
    for i, s in enumerate(seeds):
        assert np.array_equal(batch_masks(cfg, 32, [s])[0], whole[i])
    assert np.array_equal(batch_masks(cfg, 32, seeds[::-1]), whole[::-1])


def test_hashed_uniforms_are_uniform_and_per_seed() -> None:
    from pipeline.data.masks import hashed_uniforms

    u = hashed_uniforms(list(range(256)), 64, salt=1)
    assert u.dtype == np.float32 and (u > 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    assert np.array_equal(hashed_uniforms([5], 64, salt=1)[0], u[5])
    assert not np.array_equal(hashed_uniforms([5], 64, salt=2)[0], u[5])
