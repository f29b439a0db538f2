"""The one Parquet shard format shared by `caption`, `stats` and `train`.

`schema` defines the columns; `writer` writes shards atomically with a done-marker and a
manifest; `reader` lists complete shards and streams their rows; `fs` lets a shard directory be
a local path or an object-store / fsspec URI (s3://, gs://, memory://, ...). `shards.images` is
the image layer the jobs share: source listing (keys, absolute addresses), reads by address, and
the one decode policy.
"""

from shards.errors import UserError
from shards.schema import CAPTION_SCHEMA, CaptionRow, empty_caption_table, rows_to_table
from shards.writer import ShardWriter
from shards.reader import ShardError, clean_incomplete, complete_shards, done_keys, iter_batches, read_manifest

__all__ = [
    "CAPTION_SCHEMA",
    "CaptionRow",
    "ShardError",
    "ShardWriter",
    "UserError",
    "clean_incomplete",
    "complete_shards",
    "done_keys",
    "empty_caption_table",
    "iter_batches",
    "read_manifest",
    "rows_to_table",
]
