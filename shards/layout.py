"""How a shard directory is laid out: shard names, their done-markers, the staged (not yet
committed) files, the run record, the manifest, the retry journal. The reader, the writer, the
retry swap and the run skeleton name files only through here.

A shard is committed by its appearance: it is written under a staged name that readers skip (a
`.` prefix and a `.tmp` suffix: pyarrow, Spark, HF `datasets`, polars and DuckDB given
`*.parquet` all pass over it), its done-marker (rows, checksum) is written, then it is renamed to
its visible name (on object stores: one PUT of the whole object under that name). So a visible
`*.parquet` shard is always complete and always has its marker. Directories written by earlier
versions (shard renamed first, marker second) read the same: a shard counts when both exist.
"""

from __future__ import annotations

import re
from pathlib import Path

from shards import fs

SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})(?:-(?P<writer>[0-9a-f]{8}))?\.parquet$")
MANIFEST = "manifest.json"  # what the directory holds, rewritten at the end of every run
RUN_RECORD = "run.json"  # the settings of the run that writes here, recorded when it starts (shards.job)
JOURNAL = "retry-journal.json"  # the shards a retry swap is rewriting (shards.retry)
DONE = ".done"
STAGED = ".tmp"


def shard_name(prefix: str, index: int, writer_id: str) -> str:
    return f"{prefix}-{index:05d}-{writer_id}.parquet"


def done_marker(shard: str | Path) -> fs.Location:
    """The marker whose existence says `shard` is complete (a Path for local shards)."""
    return fs.with_suffix_name(shard, DONE)


def staged(shard: str | Path) -> fs.Location:
    """Where `shard` is written before its commit: a name no reader picks up."""
    loc = fs.as_location(shard)
    name = f".{fs.basename(loc)}{STAGED}"
    return loc.with_name(name) if isinstance(loc, Path) else f"{loc.rsplit('/', 1)[0]}/{name}"


def is_staged(name: str) -> bool:
    """A staged file (a crash's leftover when no run is writing)."""
    return name.startswith(".") and name.endswith(STAGED)
