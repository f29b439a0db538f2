"""Reading shards: only complete ones (done-marker present), streamed in batches.

`out_dir` is a local path or a URI (s3://, gs://, any fsspec scheme; see shards.fs). Shard paths
come back as `Path` for local directories and as URI strings otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa

from shards import fs
from shards.errors import UserError
from shards.layout import MANIFEST, SHARD_RE


class ShardError(UserError):
    """A shard directory is missing, empty or damaged; the message says how to fix it."""


def complete_shards(out_dir: str | Path) -> list[fs.Location]:
    """Shards in `out_dir` that have their done-marker, sorted by name (one directory listing)."""
    names = set(fs.list_names(out_dir))
    return [fs.join(out_dir, n) for n in sorted(names) if SHARD_RE.match(n) and n + ".done" in names]


def clean_incomplete(out_dir: str | Path) -> list[fs.Location]:
    """Delete leftovers of a crashed run: temp files and shards without a done-marker."""
    names = set(fs.list_names(out_dir))
    removed = []
    for n in sorted(names):
        orphan = SHARD_RE.match(n) and n + ".done" not in names
        if orphan or (n.startswith(".") and n.endswith(".tmp")):
            p = fs.join(out_dir, n)
            fs.delete(p)
            removed.append(p)
    return removed


def done_keys(out_dir: str | Path, where_ok: bool = False) -> set[str]:
    """Keys already present in complete shards (with `where_ok`, only rows without an error)."""
    keys: set[str] = set()
    for shard in complete_shards(out_dir):
        cols = ["key", "error"] if where_ok else ["key"]
        t = fs.read_table(shard, columns=cols)
        if where_ok:
            mask = pa.compute.is_null(t.column("error"))
            t = t.filter(mask)
        keys.update(t.column("key").to_pylist())
    return keys


def iter_batches(
    out_dir: str | Path, columns: Sequence[str] | None = None, batch_size: int = 4096
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from every complete shard of `out_dir`."""
    shards = complete_shards(out_dir)
    if not shards:
        raise ShardError(f"no complete shards in {out_dir}: run `t2i-data caption --out {out_dir}` first")
    for shard in shards:
        pf = fs.parquet_file(shard)
        yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a shard directory, or {} if none was written yet."""
    path = fs.join(out_dir, MANIFEST)
    return json.loads(fs.read_text(path)) if fs.exists(path) else {}
