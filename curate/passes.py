"""Whole-dataset passes over the score shards, each into its own directory under `scores/`:
`dedup/` (exact and CLIP near-duplicates, curate.dedup) and `phash/` (perceptual-duplicate groups,
curate.phash_groups). A pass is rebuilt when the run added rows or its directory has no manifest
(the manifest is written last: a directory without one is a crashed pass). Each pass's rows are
in the score shards' order, one per score row."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.reader import complete_shards, iter_batches, read_manifest
from shards.writer import ShardWriter, delete_shard, write_manifest

PASSES = ("dedup", "phash")  # the pass directories select joins, in this order


def rebuild(out: fs.Location, name: str, tables: Callable[[], Iterator[pa.Table]], schema: pa.Schema,
            config: dict[str, Any], fresh: bool, flag: str) -> int:
    """(Re)build `out/name/` from `tables()` when `fresh` or it is incomplete; returns how many of
    its rows have the boolean column `flag` set."""
    pass_dir = fs.join(out, name)
    if fresh or not read_manifest(pass_dir):
        if fs.exists(fs.join(pass_dir, "manifest.json")):
            fs.delete(fs.join(pass_dir, "manifest.json"))
        for shard in complete_shards(pass_dir) if fs.exists(pass_dir) else []:
            delete_shard(shard)
        writer = ShardWriter(pass_dir, schema=schema, prefix=name)
        for table in tables():
            writer.write_table(table)
        write_manifest(pass_dir, config=config, extra={"schema": name})
    return sum(pc.sum(b.column(0)).as_py() or 0 for b in iter_batches(complete_shards(pass_dir), [flag]))
