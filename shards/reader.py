"""Reading shards: only complete ones (done-marker present), streamed in batches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shards.errors import UserError
from shards.writer import MANIFEST, SHARD_RE, done_marker


class ShardError(UserError):
    """A shard directory is missing, empty or damaged; the message says how to fix it."""


def complete_shards(out_dir: str | Path) -> list[Path]:
    """Shards in `out_dir` that have their done-marker, sorted by name."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if SHARD_RE.match(p.name) and done_marker(p).exists())


def clean_incomplete(out_dir: str | Path) -> list[Path]:
    """Delete leftovers of a crashed run: temp files and shards without a done-marker."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.is_dir():
        return removed
    for p in out_dir.iterdir():
        orphan = SHARD_RE.match(p.name) and not done_marker(p).exists()
        if orphan or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def done_keys(out_dir: str | Path, where_ok: bool = False) -> set[str]:
    """Keys already present in complete shards (with `where_ok`, only rows without an error)."""
    keys: set[str] = set()
    for shard in complete_shards(out_dir):
        cols = ["key", "error"] if where_ok else ["key"]
        t = pq.read_table(shard, columns=cols)
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
        pf = pq.ParquetFile(shard)
        yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a shard directory, or {} if none was written yet."""
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}
