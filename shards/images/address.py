"""Where one image's bytes are: an ADDRESS, and an ImageReader that reads by address in O(1).

    /abs/sam/sa_1.jpg                       a plain file (an absolute path, or a URI: s3://b/sa_1.jpg)
    /abs/sa_000000.tar#tar:1536+804112      a tar member: data offset + size in the (uncompressed) archive
    /abs/laion.parquet#row:17               a Parquet row (file-wide row index)

Addresses are absolute (or URIs; `file://` ones are spelled as the local paths they name), so a
later job reads them from any working directory. Tar members are addressed by byte offset, never
by name: two members with the same name are two addresses, and the bytes read are exactly the
ones the lister saw.

ImageReader keeps what makes the next read cheap, so reading N images of one source costs O(N):
one open handle per tar (`read_at`, thread-safe), the open ParquetFile and its last row groups
(image column only), and for compressed tars one forward-only decompression stream.
"""

from __future__ import annotations

import bisect
import gzip
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

from shards import fs
from shards.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
COMPRESSED_TAR_EXTS = (".tar.gz", ".tgz")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
_FRAGMENT = re.compile(r"^(?P<loc>.+)#(?:tar:(?P<offset>\d+)\+(?P<size>\d+)|row:(?P<row>\d+))$")


def absolute(location: str | os.PathLike) -> str:
    """A URI as given (no trailing slash), or the absolute, normalised local path."""
    s = str(location)
    return s.rstrip("/") if fs.is_uri(s) else os.path.abspath(s)


def canonical(location: str) -> str:
    """The location as addresses spell it: `file://` URIs become the local paths they name."""
    return str(fs.as_location(location)) if fs.scheme(location) == "file" else location


def is_tar(name: str) -> bool:
    return name.endswith(TAR_EXTS)


def is_compressed_tar(name: str) -> bool:
    return name.endswith(COMPRESSED_TAR_EXTS)


def pick_column(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    """The first of `wanted` present in `columns`, case-insensitively."""
    lower = {c.lower(): c for c in columns}
    return next((lower[w.lower()] for w in wanted if w.lower() in lower), None)


@dataclass(frozen=True)
class Address:
    """One image's location: `location` (absolute path or URI) plus a tar span or a Parquet row."""

    location: str
    offset: int | None = None  # tar member: data offset in the uncompressed archive
    size: int | None = None
    row: int | None = None  # Parquet: file-wide row index

    def __str__(self) -> str:
        if self.offset is not None:
            return f"{self.location}#tar:{self.offset}+{self.size}"
        if self.row is not None:
            return f"{self.location}#row:{self.row}"
        return self.location

    @classmethod
    def parse(cls, text: str) -> "Address":
        m = _FRAGMENT.match(text)
        if m is None:
            return cls(text)
        if m["row"] is not None:
            return cls(m["loc"], row=int(m["row"]))
        return cls(m["loc"], offset=int(m["offset"]), size=int(m["size"]))


def tar_members(location: str) -> dict[str, list[Address]]:
    """The member index of one tar, built with one pass over its headers: name -> addresses of
    the regular-file members of that name, in archive order (only legacy rows that name a member
    instead of an offset need it)."""
    index: dict[str, list[Address]] = {}
    seekable = not fs.is_uri(location) and not is_compressed_tar(location)
    with fs.open_input(location) as f, tarfile.open(fileobj=f, mode="r:" if seekable else "r|*") as tf:
        for m in tf:  # "r:" seeks over the data: a header scan
            if m.isfile():
                index.setdefault(m.name, []).append(Address(location, offset=m.offset_data, size=m.size))
    return index


class _ForwardStream:
    """A compressed tar read front to back: offsets are in the decompressed stream, so a read
    behind the current position reopens it (rows arrive in archive order, so that is rare)."""

    def __init__(self, location: str) -> None:
        self.location, self.pos, self.file = location, 0, None

    def read(self, offset: int, size: int) -> bytes:
        if self.file is None or offset < self.pos:
            self.close()
            self.file, self.pos = gzip.GzipFile(fileobj=fs.open_input(self.location)), 0
        while self.pos < offset:  # skip forward in bounded steps
            step = self.file.read(min(offset - self.pos, 1 << 20))
            if not step:
                raise OSError(f"{self.location} ends before offset {offset}")
            self.pos += len(step)
        data = self.file.read(size)
        self.pos += len(data)
        if len(data) != size:
            raise OSError(f"{self.location} ends inside the member at offset {offset}")
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _ParquetImages:
    """One Parquet file's image column, read one row group at a time (the last few cached)."""

    def __init__(self, location: str, cached_groups: int = 2) -> None:
        self.file = fs.parquet_file(location)
        self.column = pick_column(self.file.schema_arrow.names, IMAGE_COLUMNS)
        if self.column is None:
            raise UserError(f"{location} has no image column (looked for {', '.join(IMAGE_COLUMNS)}): write image bytes into one of them")
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.groups: OrderedDict[int, list] = OrderedDict()
        self.cached_groups = cached_groups

    def read(self, row: int) -> bytes:
        if not 0 <= row < self.starts[-1]:
            raise OSError(f"row {row} is out of range ({self.starts[-1]} rows)")
        g = bisect.bisect_right(self.starts, row) - 1
        if g not in self.groups:
            self.groups[g] = self.file.read_row_group(g, columns=[self.column]).column(0).to_pylist()
            while len(self.groups) > self.cached_groups:
                self.groups.popitem(last=False)
        value = self.groups[g][row - self.starts[g]]
        if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        return value or b""


class ImageReader:
    """Reads image bytes by address, with indexed access (see the module docstring).
    Thread-safe: decode workers share one reader."""

    def __init__(self, max_open: int = 16) -> None:
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.max_open = max_open

    def read(self, address: Address | str) -> bytes:
        a = Address.parse(address) if isinstance(address, str) else address
        if a.offset is None and a.row is None:
            return fs.read_bytes(a.location)
        handle, lock = self._handle(a)
        if a.row is not None:
            with lock:
                return handle.read(a.row)
        if isinstance(handle, _ForwardStream):
            with lock:
                return handle.read(a.offset, a.size)
        data = handle.read_at(a.size, a.offset)  # RandomAccessFile.read_at is thread-safe (pread)
        data = data if isinstance(data, bytes) else data.to_pybytes()
        if len(data) != a.size:
            raise OSError(f"{a.location} ends inside the member at offset {a.offset}")
        return data

    def _handle(self, a: Address):
        with self._lock:
            if a.location in self._handles:
                self._handles.move_to_end(a.location)
                return self._handles[a.location], self._locks[a.location]
        if a.row is not None:
            handle = _ParquetImages(a.location)
        elif is_compressed_tar(a.location):
            handle = _ForwardStream(a.location)
        else:
            filesystem, path = fs.resolve(a.location)
            handle = filesystem.open_input_file(path)
        with self._lock:
            handle = self._handles.setdefault(a.location, handle)
            lock = self._locks.setdefault(a.location, threading.Lock())
            while len(self._handles) > self.max_open:  # dropped, not closed: a worker may hold it
                old, _ = self._handles.popitem(last=False)
                self._locks.pop(old, None)
            return handle, lock

    def close(self) -> None:
        with self._lock:
            for h in self._handles.values():
                if hasattr(h, "close"):
                    h.close()
            self._handles.clear()
            self._locks.clear()


def legacy_address(source: str, member: str | None, cache: dict[str, dict] | None = None) -> Address:
    """The address of a row written before addresses existed (caption schema 1): `source` as
    typed (relative to the working directory) and `member` a tar member name or a Parquet row.
    A tar member name that occurs twice in its archive is ambiguous: OSError."""
    loc = absolute(source)
    if member is None:
        return Address(loc)
    if loc.endswith(".parquet"):
        return Address(loc, row=int(member))
    index = cache.setdefault(loc, {}) if cache is not None else {}
    if not index:
        index.update(tar_members(loc))
    found = index.get(member, [])
    if len(found) != 1:
        raise OSError(f"{member} occurs {len(found)} times in {loc}: recaption it (rows now address members by offset)")
    return found[0]


def image_suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()
