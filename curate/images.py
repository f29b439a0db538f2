"""Where scoring gets a caption row's image: ONE function, `read_image`, over the image layer.

A row's bytes come from shards.images.RowImageReader (embedded `image` bytes, the `address`, or
for rows written before addresses existed `source` + `member`), one shared, thread-safe reader
(tar offsets, Parquet row groups: N images cost O(N)); decoding is the image layer's one policy,
through shards.images.fit (bomb guard, JPEG draft, EXIF, RGB, resize).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from shards.images import READ_ERRORS, ImageError, RowImageReader
from shards.images.fit import prepare_image

_ROWS = RowImageReader()


@dataclass
class LoadedImage:
    data: bytes  # the encoded file, as stored
    image: Image.Image  # RGB, within the decode size
    width: int  # original size
    height: int


def read_image(row: dict, max_short: int, max_long: int) -> LoadedImage:
    """Read and decode a caption row's image; raises ImageError with the reason it is unusable."""
    try:
        data = _ROWS.read(row)
    except READ_ERRORS as e:
        raise ImageError(f"unreadable source: {e}") from None
    prepared = prepare_image(data, max_short, max_long)
    return LoadedImage(data, prepared.image, prepared.width, prepared.height)
