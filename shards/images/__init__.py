"""The image layer: the contract between the jobs that read source images (caption, features).

- `sources`: list folders, SA-1B tars and Parquet files (local or URIs); every image gets a key,
  unique in the run and stable across reruns, and an absolute address.
- `address`: addresses (`path`, `tar#tar:offset+size`, `parquet#row:n`) and ImageReader, which
  reads by address with indexed access (tar offsets, Parquet row groups): N images cost O(N).
- `decode`: the one decode policy (bomb guard, JPEG draft, EXIF orientation, RGB).
- `rows`: a caption row's image bytes (embedded, by address, or by a schema-1 source + member).
"""

from shards.images.address import Address, ImageReader, legacy_address
from shards.images.decode import DEFAULT_MAX_PIXELS, Decoded, ImageError, decode_image
from shards.images.rows import READ_ERRORS, RowImageReader
from shards.images.sources import ImageItem, SourceEntry, count_items, iter_entries, iter_entry, iter_sources, validate_sources

__all__ = [
    "Address",
    "DEFAULT_MAX_PIXELS",
    "Decoded",
    "ImageError",
    "ImageItem",
    "ImageReader",
    "READ_ERRORS",
    "RowImageReader",
    "SourceEntry",
    "count_items",
    "decode_image",
    "iter_entries",
    "iter_entry",
    "iter_sources",
    "legacy_address",
    "validate_sources",
]
