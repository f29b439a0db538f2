"""A caption row's image bytes, for every job that reads the images a caption shard names (score,
features): the ONE place that knows where a row's image is.

    rows = RowImageReader()
    data = rows.read(row)     # embedded `image` bytes, else by `address`, else (caption schema 1) by source + member

Rows carry their image as bytes (`image`, with --embed-images) or as an absolute `address`
(shards.images.address); rows written before addresses existed name `source` + `member`,
resolved by legacy_address (tar member indexes cached per reader). Reads go through one shared,
thread-safe ImageReader (tar offsets, Parquet row groups: N images cost O(N)).
"""

from __future__ import annotations

import tarfile
from typing import Any

import pyarrow as pa

from shards.errors import UserError
from shards.images.address import Address, ImageReader, is_compressed_tar, legacy_address

# what reading a row's image may raise: a source gone, short or not what the row says
READ_ERRORS = (OSError, ValueError, tarfile.TarError, pa.ArrowException, UserError)


class RowImageReader:
    """Caption row -> its encoded image bytes. Thread-safe: decode workers share one."""

    def __init__(self) -> None:
        self.reader = ImageReader()
        self._legacy: dict[str, dict] = {}  # tar -> member index, for schema-1 rows that name members

    def address(self, row: dict[str, Any]) -> Address:
        """Where a row's image is: its `address`, or (schema-1 rows) its source + member."""
        if row.get("address"):
            return Address.parse(row["address"])
        if not row.get("source"):
            raise OSError("the row has neither image bytes nor an address")
        return legacy_address(row["source"], row.get("member"), self._legacy)

    def read(self, row: dict[str, Any]) -> bytes:
        """The encoded image of a caption row; one of READ_ERRORS when its source is gone or lacks it."""
        return row.get("image") or self.reader.read(self.address(row))

    def read_ahead(self, row: dict[str, Any]) -> dict[str, Any]:
        """For a row in a compressed tar (which only streams forward), read its bytes into
        `image` now: call it on the rows in order, from the one thread that walks them, and
        `read` in any order from workers. Returns the row."""
        if not row.get("image"):
            a = self.address(row)
            if a.offset is not None and is_compressed_tar(a.location):
                row["image"] = self.reader.read(a)
        return row

    def close(self) -> None:
        """Close the open sources."""
        self.reader.close()
