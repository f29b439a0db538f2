"""Reading shard directories: only committed shards, with column selection and batching.

    iter_batches("out/", columns=["key", "caption"])             # every committed shard
    shards = open_shards("out/", "caption")                       # footers: columns, row groups
    iter_batches([(shards[0], [0, 2])], columns=["key"])          # some row groups (a rank's share)

A shard counts once it and its done-marker are both visible (shards.layout). Every read checks
the Parquet page checksums the writer records (shards.fs), so a flipped bit is an error, not
wrong rows; a damaged or foreign committed file (random bytes, truncated, no `key` column) is
one ShardError line naming it and the fix, whichever job reads it. `out_dir` is a local
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
from shards.errors import UserError, resource_error
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


def damaged(location: fs.Location, e: BaseException) -> UserError:
    """The one-line error for a committed shard that cannot be read: damaged (truncated, a
    flipped bit its page checksums catch) or no Parquet at all. A resource error (denied, ...)
    keeps its own message."""
    found = resource_error(e, location, "read")
    if found is not None:
        return found
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ShardError(f"{location} is damaged or not a Parquet shard ({reason}): move it and its {DONE} marker out of "
                      f"{_parent(location)}, then rerun the job that wrote it to redo its rows")


def _parent(location: fs.Location) -> str:
    return str(location.parent) if isinstance(location, Path) else str(location).rsplit("/", 1)[0]


def _read_keys(shard: fs.Location, where_ok: bool) -> list[str]:
    cols = ["key", "error"] if where_ok else ["key"]
    try:
        t = fs.read_table(shard, columns=cols)
    except (pa.ArrowException, OSError) as e:
        if "key" not in _columns(shard):
            raise foreign(shard) from None
        raise damaged(shard, e) from None
    if where_ok:
        t = t.filter(pc.is_null(t.column("error")))
    return t.column("key").to_pylist()


def _columns(shard: fs.Location) -> list[str]:
    try:
        return fs.read_schema(shard).names
    except (pa.ArrowException, OSError) as e:
        raise damaged(shard, e) from None


def foreign(shard: fs.Location, columns: Sequence[str] = ()) -> ShardError:
    """The error for a committed file that is no shard of this project (it has no `key` column)."""
    have = f" (its columns: {', '.join(columns)})" if columns else ""
    return ShardError(f"{shard} has no key column{have}: it is not a t2i-data shard: move it and its {DONE} marker "
                      f"out of {_parent(shard)}")


def done_keys(out_dir: str | Path, where_ok: bool = False) -> set[str]:
    """Keys already present in complete shards (with `where_ok`, only rows without an error)."""
    keys: set[str] = set()
    for shard in complete_shards(out_dir):
        keys.update(_read_keys(shard, where_ok))
    return keys


def read_footer(location: str | Path, required: Sequence[str] = ("key",)) -> Shard:
    """One shard's footer: its schema and the rows of each row group. ShardError (one line) for
    a damaged file or one without the `required` columns (a foreign file)."""
    try:
        md = fs.parquet_file(location).metadata
        shard = Shard(location, md.schema.to_arrow_schema(), tuple(md.row_group(g).num_rows for g in range(md.num_row_groups)))
    except (pa.ArrowException, OSError) as e:
        raise damaged(location, e) from None
    if "key" in required and "key" not in shard.columns:
        raise foreign(location, shard.columns)
    missing = [c for c in required if c not in shard.columns]
    if missing:
        raise ShardError(f"{location} has no {', '.join(missing)} column: pass shards written by the job that makes them")
    return shard


def open_shards(out_dir: str | Path, kind: str = "", fix: str | None = None, required: Sequence[str] = ("key",)) -> list[Shard]:
    """The committed shards of `out_dir` with their footers, in name order; ShardError (one
    line: no complete `kind` shards, then `fix`) when there are none, or for a damaged or
    foreign one (read_footer)."""
    loc = fs.as_location(out_dir)
    if isinstance(loc, Path) and loc.is_file():
        raise ShardError(f"{out_dir} is a file, not a shard directory: pass the directory the {kind or 'caption'} job wrote")
    found = complete_shards(out_dir)
    if not found:
        fix = fix or f"run `t2i-data caption --out {out_dir}` first"
        gone = "" if fs.exists(loc) else " (it does not exist)"
        raise ShardError(f"no complete {kind + ' ' if kind else ''}shards in {out_dir}{gone}: {fix}")
    return [read_footer(s, required) for s in found]


def iter_batches(source: Source, columns: Sequence[str] | None = None, batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    """Record batches of committed shards, in order: `source` is a shard directory (every
    committed shard; ShardError when it has none) or a list of shards, each alone or paired with
    the row groups to read (each read once, one at a time). With `columns`, the ones each shard
    has (a column a shard lacks is absent from its batches: older schemas)."""
    if isinstance(source, (str, Path)):
        source = open_shards(source)
    for item in source:
        shard, groups = item if isinstance(item, tuple) and not isinstance(item, Shard) else (item, None)
        location = shard.location if isinstance(shard, Shard) else shard
        try:
            yield from _shard_batches(location, columns, batch_size, groups)
        except (pa.ArrowException, OSError) as e:  # truncated, or a page whose checksum fails
            raise damaged(location, e) from None


def _shard_batches(location: fs.Location, columns: Sequence[str] | None, batch_size: int,
                   groups: Sequence[int] | None) -> Iterator[pa.RecordBatch]:
    pf = fs.parquet_file(location)
    wanted = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
    if groups is None:
        yield from pf.iter_batches(batch_size=batch_size, columns=wanted)
        return
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
