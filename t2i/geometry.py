"""Image geometry of the features job: PixArt's aspect-ratio bins, the size an image is encoded
at, the short side its JPEG may be draft-decoded to, and the pixels -> tensor step."""

from __future__ import annotations

import math

import numpy as np
import torch

from shards.errors import UserError


def aspect_ratio_table(resolution: int) -> dict[str, list[float]]:
    """PixArt's aspect-ratio bins (h/w -> [h, w]) shipped by diffusers for 256/512/1024."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    tables = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
    if resolution not in tables:
        raise UserError(f"aspect-ratio buckets exist for resolutions 256, 512 and 1024, not {resolution}: set buckets = false or pick one of those")
    return tables[resolution]


def target_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """(height, width) in pixels: the square `resolution`, or the closest aspect-ratio bin."""
    if not buckets:
        return resolution, resolution
    table = aspect_ratio_table(resolution)
    ratio = min(table, key=lambda r: abs(float(r) - height / width))
    h, w = table[ratio]
    return int(h), int(w)


def draft_short(width: int, height: int, resolution: int, buckets: bool) -> int:
    """The short side a `width` x `height` image must keep for its target size (image_to_tensor
    covers the target): what a JPEG draft decode may go down to."""
    h, w = target_size(width, height, resolution, buckets)
    return math.ceil(min(width, height) * max(h / height, w / width))


def image_to_tensor(img, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width), centre-crop, scale to [-1, 1]; (3, H, W)."""
    from PIL import Image

    s = max(height / img.height, width / img.width)
    nw, nh = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)
