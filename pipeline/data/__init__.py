"""The data layer: WebDataset shards in, masked batches out. One module per concern:

    loader.py   build_loader and the two stream classes (exact epochs, resampled)
    tar.py      the streaming tar reader: raw samples by index, counts from headers alone

The public names are re-exported here, so `from pipeline.data import build_loader` works.
"""

from pipeline.data.loader import (
    Loader,
    build_loader,
    expand_urls,
    plan_rank_batches,
    shard_sample_counts,
)

__all__ = ["Loader", "build_loader", "expand_urls", "plan_rank_batches", "shard_sample_counts"]
