"""The one Parquet shard format shared by `caption`, `stats` and `train`.

`schema` defines the columns; `layout` names the files; `writer` commits shards atomically (a
shard appears only complete, with its done-marker) and writes the manifest; `reader` reads the
committed shards with column selection and batching; `job` is the run skeleton every writing job
shares (lock, settings recorded and checked, clean-up, done keys, writer, ledger, manifest,
summary); `fs` lets a shard directory be a local path or an object-store / fsspec URI (s3://,
gs://, memory://, ...). `shards.images` is the image layer the jobs share: source listing (keys,
absolute addresses), reads by address, a caption row's image bytes, and the one decode policy.
"""

from shards.errors import UserError
from shards.schema import CAPTION_SCHEMA, CaptionRow, empty_caption_table, rows_to_table
from shards.writer import ShardWriter
from shards.reader import (
    Shard,
    ShardError,
    clean_incomplete,
    complete_shards,
    done_keys,
    iter_batches,
    iter_rows,
    open_shards,
    read_manifest,
)

__all__ = [
    "CAPTION_SCHEMA",
    "CaptionRow",
    "Shard",
    "ShardError",
    "ShardWriter",
    "UserError",
    "clean_incomplete",
    "complete_shards",
    "done_keys",
    "empty_caption_table",
    "iter_batches",
    "iter_rows",
    "open_shards",
    "read_manifest",
    "rows_to_table",
]
