"""The data layer: WebDataset shards in, masked batches out. One module per concern, in the
order a sample meets them:

    urls.py     shard URLs: split_urls (the one comma-list splitter), expand_urls, url_scheme
    open.py     opening a shard URL (local, fsspec; no patched tables) and a file beside it
    tar.py      the streaming tar reader: raw samples by index, counts from headers alone
    manifest.py manifest.json beside a shard set: its name, writing it, reading shard entries
    counts.py   per-shard sample counts (manifest first, else a tar header scan)
    plan.py     the exact-epoch plan: shard order, each rank's batches, each worker's share
    samples.py  raw sample -> pixels (decode, resize, crop, flip, per-sample seeds) -> batch dict
    masks.py    the mask shapes and MASKS, the registry of mask kinds (a new kind is one entry)
    loader.py   build_loader and the two stream classes (exact epochs, resampled)
    ray_data.py data.input=ray_data: the same batches decoded by Ray Data tasks on any CPU node
                (imports Ray only when called; pipeline.ray_train wires it in)
    writer.py   image folders / digits -> shards + manifest (jobs.make_shards)

The reading side's public names are re-exported here (`from pipeline.data import
build_loader`); the writer is imported from pipeline.data.writer.
"""

from pipeline.data.counts import shard_sample_counts
from pipeline.data.loader import Loader, build_loader
from pipeline.data.plan import plan_rank_batches
from pipeline.data.urls import expand_urls, split_urls

__all__ = [
    "Loader",
    "build_loader",
    "expand_urls",
    "plan_rank_batches",
    "shard_sample_counts",
    "split_urls",
]
