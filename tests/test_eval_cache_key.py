"""The feature-cache key follows the shards' content: shards rewritten at the same paths (or a
new manifest beside them) miss the cache instead of reusing stale features."""

from __future__ import annotations

import json

import numpy as np
from test_eval_protocol import write_shards

from evaluation.extraction import SplitSpec, shards_digest, split_features
from evaluation.features import raw_pixels_encoder


def test_rewritten_shards_get_new_features(tmp_path):
    urls = write_shards(tmp_path / "s", "train", 2, 10, seed=0)
    spec = SplitSpec("train", urls, 32, batch_size=8)
    enc = raw_pixels_encoder()
    first = split_features(enc, ["pixels"], spec, tmp_path / "cache")["pixels"]
    key = spec.split_key()
    assert spec.split_key() == key  # stable while nothing changes
    again = split_features(enc, ["pixels"], spec, tmp_path / "cache")["pixels"]
    np.testing.assert_array_equal(again.x, first.x)

    # Same paths, other images: a different key, and the features of the new images.
    write_shards(tmp_path / "s", "train", 2, 10, seed=5)
    fresh = split_features(enc, ["pixels"], spec, tmp_path / "cache")["pixels"]
    assert spec.split_key() != key
    assert not np.array_equal(fresh.x, first.x)
    assert len(list((tmp_path / "cache").rglob("*.parquet"))) == 2


def test_the_manifest_is_part_of_the_digest(tmp_path):
    urls = write_shards(tmp_path / "s", "train", 1, 5, seed=0)
    before = shards_digest(urls)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"shards": [], "total": 5}))
    with_manifest = shards_digest(urls)
    assert with_manifest != before
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"shards": [], "total": 6}))
    assert shards_digest(urls) not in (before, with_manifest)
