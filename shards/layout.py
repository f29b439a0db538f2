"""How a shard directory is laid out: shard names, their done-markers, the manifest, the retry
journal. Both the reader and the writer (and the retry swap) name files only through here."""

from __future__ import annotations

import re
from pathlib import Path

from shards import fs

SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})(?:-(?P<writer>[0-9a-f]{8}))?\.parquet$")
MANIFEST = "manifest.json"
JOURNAL = "retry-journal.json"  # {new shard: [old shards]} of a retry swap in progress (shards.retry)


def shard_name(prefix: str, index: int, writer_id: str) -> str:
    return f"{prefix}-{index:05d}-{writer_id}.parquet"


def done_marker(shard: str | Path) -> fs.Location:
    """The marker whose existence says `shard` is complete (a Path for local shards)."""
    return fs.with_suffix_name(shard, ".done")
