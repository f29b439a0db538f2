"""Where scoring gets a caption row's image: ONE function, `read_image`, so the image layer can
take its place later.

A row carries its image either as bytes (`image`, with --embed-images) or as an address
(`source`, plus `member` for tar members and Parquet rows). Tar members are found through an
index of the tar's headers, built once per tar; Parquet rows through the file's row groups, one
group held at a time. Decoding is autolabel.prepare's (EXIF, RGB, bomb guard, JPEG draft).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from functools import lru_cache

from autolabel.prepare import ImageError, prepare_image
from autolabel.sources import IMAGE_COLUMNS, _pick
from shards import fs
from PIL import Image


@dataclass
class LoadedImage:
    data: bytes  # the encoded file, as stored
    image: Image.Image  # RGB, within the decode size
    width: int  # original size
    height: int


@lru_cache(maxsize=8)
def _tar_index(path: str) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size), from the headers alone (seeks over the data)."""
    with tarfile.open(path, mode="r:") as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}


@lru_cache(maxsize=2)
def _parquet_group(path: str, group: int) -> list:
    pf = fs.parquet_file(path)
    column = _pick(pf.schema_arrow.names, IMAGE_COLUMNS)
    values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    return [v.get("bytes") if isinstance(v, dict) else v for v in values]


@lru_cache(maxsize=8)
def _group_sizes(path: str) -> tuple[int, ...]:
    meta = fs.parquet_file(path).metadata
    return tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))


def _parquet_row(path: str, row: int) -> bytes:
    for g, n in enumerate(_group_sizes(path)):
        if row < n:
            return _parquet_group(path, g)[row] or b""
        row -= n
    raise OSError(f"row {row} is past the end of {path}")


def read_bytes(row: dict) -> bytes:
    """The encoded image of a caption row; OSError when its source is gone or lacks it."""
    if row.get("image"):
        return row["image"]
    source, member = row.get("source"), row.get("member")
    if not source:
        raise OSError("the row has neither image bytes nor a source")
    if member is None:
        return fs.read_bytes(source)
    if source.endswith(".parquet"):
        return _parquet_row(source, int(member))
    if source.endswith(".tar"):
        offset, size = _tar_index(source).get(member, (None, 0))
        if offset is None:
            raise OSError(f"{member} is not in {source}")
        with open(source, "rb") as f:
            f.seek(offset)
            return f.read(size)
    raise OSError(f"cannot address member {member} of {source} (compressed tar?): caption it with --embed-images")


def read_image(row: dict, max_short: int, max_long: int) -> LoadedImage:
    """Read and decode a caption row's image; raises ImageError with the reason it is unusable."""
    try:
        data = read_bytes(row)
    except (OSError, tarfile.TarError) as e:
        raise ImageError(f"unreadable source: {e}") from None
    prepared = prepare_image(data, max_short, max_long)
    return LoadedImage(data, prepared.image, prepared.width, prepared.height)
