"""Reading shard directories: only committed shards, with column selection and batching.

    iter_batches("out/", columns=["key", "caption"])             # every committed shard
    shards = open_shards("out/", "caption")                       # footers: columns, row groups
    iter_batches([(shards[0], [0, 2])], columns=["key"])          # some row groups (a rank's share)

A shard counts once it and its done-marker are both visible (shards.layout). `out_dir` is a local
path or a URI (s3://, gs://, any fsspec scheme; see shards.fs). Shard paths come back as `Path`
for local directories and as URI strings otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence, Union

import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.errors import UserError
from shards.layout import DONE, MANIFEST, SHARD_RE, is_staged


class ShardError(UserError):
    """A shard directory is missing, empty or damaged; the message says how to fix it."""


class Shard(NamedTuple):
    """A committed shard, from its footer: where it is, its schema, the rows of each row group."""

    location: fs.Location
    schema: pa.Schema
    group_rows: tuple[int, ...]

    @property
    def columns(self) -> list[str]:
        """The shard's column names."""
        return self.schema.names

    @property
    def rows(self) -> int:
        """The shard's row count."""
        return sum(self.group_rows)


# what iter_batches reads: a shard directory, or shards (locations or footers), each alone or
# with the row groups to read
Source = Union[str, Path, Sequence[Union[fs.Location, Shard, tuple[Union[fs.Location, Shard], Sequence[int]]]]]


def complete_shards(out_dir: str | Path) -> list[fs.Location]:
    """Shards in `out_dir` that have their done-marker, sorted by name (one directory listing)."""
    names = set(fs.list_names(out_dir))
    return [fs.join(out_dir, n) for n in sorted(names) if SHARD_RE.match(n) and n + DONE in names]


def clean_incomplete(out_dir: str | Path) -> list[fs.Location]:
    """Delete leftovers of a crashed run: staged files, markers whose shard never appeared, and
    shards without a marker (a crash of an earlier version, which renamed before the marker)."""
    names = set(fs.list_names(out_dir))
    removed = []
    for n in sorted(names):
        orphan_shard = SHARD_RE.match(n) and n + DONE not in names
        orphan_marker = n.endswith(DONE) and SHARD_RE.match(n[: -len(DONE)]) and n[: -len(DONE)] not in names
        if orphan_shard or orphan_marker or is_staged(n):
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
            t = t.filter(pc.is_null(t.column("error")))
        keys.update(t.column("key").to_pylist())
    return keys


def read_footer(location: str | Path) -> Shard:
    """One shard's footer: its schema and the rows of each row group."""
    md = fs.parquet_file(location).metadata
    return Shard(location, md.schema.to_arrow_schema(), tuple(md.row_group(g).num_rows for g in range(md.num_row_groups)))


def open_shards(out_dir: str | Path, kind: str = "", fix: str | None = None) -> list[Shard]:
    """The committed shards of `out_dir` with their footers, in name order; ShardError (one
    line: no complete `kind` shards, then `fix`) when there are none."""
    found = complete_shards(out_dir)
    if not found:
        fix = fix or f"run `t2i-data caption --out {out_dir}` first"
        raise ShardError(f"no complete {kind + ' ' if kind else ''}shards in {out_dir}: {fix}")
    return [read_footer(s) for s in found]


def iter_batches(source: Source, columns: Sequence[str] | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Record batches of committed shards, in order: `source` is a shard directory (every
    committed shard; ShardError when it has none) or a list of shards, each alone or paired with
    the row groups to read (each read once, one at a time). With `columns`, the ones each shard
    has (a column a shard lacks is absent from its batches: older schemas)."""
    if isinstance(source, (str, Path)):
        source = open_shards(source)
    for item in source:
        shard, groups = item if isinstance(item, tuple) and not isinstance(item, Shard) else (item, None)
        pf = fs.parquet_file(shard.location if isinstance(shard, Shard) else shard)
        wanted = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
        if groups is None:
            yield from pf.iter_batches(batch_size=batch_size, columns=wanted)
            continue
        for g in groups:  # one row group (~1 MiB with embedded images) in memory at a time
            yield from pf.read_row_group(g, columns=wanted).to_batches(batch_size)


def iter_rows(source: Source, columns: Sequence[str] | None = None, batch_size: int = 256) -> Iterator[dict]:
    """The rows of iter_batches, as dicts."""
    for batch in iter_batches(source, columns, batch_size):
        yield from batch.to_pylist()


def read_manifest(out_dir: str | Path) -> dict:
    """The manifest of a shard directory, or {} if none was written yet."""
    path = fs.join(out_dir, MANIFEST)
    return json.loads(fs.read_text(path)) if fs.exists(path) else {}
