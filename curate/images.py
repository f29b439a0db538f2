"""Where scoring gets a caption row's image: ONE function, `read_image`, over the image layer.

A row carries its image as bytes (`image`, with --embed-images) or as an address (`address`;
rows written before addresses existed: `source` + `member`, resolved by
shards.images.legacy_address). Bytes are read by one shared, thread-safe
shards.images.ImageReader (tar offsets, Parquet row groups: N images cost O(N)); decoding is the
image layer's one policy, through shards.images.fit (bomb guard, JPEG draft, EXIF, RGB, resize).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

from PIL import Image

from shards.images import ImageError
from shards.images.fit import prepare_image
from shards.images import Address, ImageReader, legacy_address

_READER = ImageReader()
_LEGACY_TARS: dict[str, dict] = {}  # tar -> member index, for schema-1 rows that name members


@dataclass
class LoadedImage:
    data: bytes  # the encoded file, as stored
    image: Image.Image  # RGB, within the decode size
    width: int  # original size
    height: int


def read_bytes(row: dict) -> bytes:
    """The encoded image of a caption row; OSError when its source is gone or lacks it."""
    if row.get("image"):
        return row["image"]
    if row.get("address"):
        return _READER.read(Address.parse(row["address"]))
    if not row.get("source"):
        raise OSError("the row has neither image bytes nor an address")
    return _READER.read(legacy_address(row["source"], row.get("member"), _LEGACY_TARS))


def read_image(row: dict, max_short: int, max_long: int) -> LoadedImage:
    """Read and decode a caption row's image; raises ImageError with the reason it is unusable."""
    try:
        data = read_bytes(row)
    except (OSError, ValueError, tarfile.TarError) as e:
        raise ImageError(f"unreadable source: {e}") from None
    prepared = prepare_image(data, max_short, max_long)
    return LoadedImage(data, prepared.image, prepared.width, prepared.height)
