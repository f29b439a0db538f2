"""Model-agnostic image preparation: the shared decode policy (shards.images.decode), then a resize
that fits within max_short x max_long (the paper's 400 / 800), never upscaling. Scoring reads
images this way; the caption job resizes to its model's own input size (autolabel.prepare)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from shards.images.decode import DEFAULT_MAX_PIXELS, decode_image


@dataclass
class Prepared:
    image: Image.Image  # RGB, short side <= max_short and long side <= max_long
    width: int  # original size, after EXIF orientation
    height: int


def target_size(width: int, height: int, max_short: int, max_long: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and short <= max_short, long <= max_long (never upscales)."""
    short, long = min(width, height), max(width, height)
    scale = min(1.0, max_short / short, max_long / long)
    return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(
    data: bytes, max_short: int = 400, max_long: int = 800, max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short: int | None = None,
) -> Prepared:
    """Decode `data` into an RGB image within max_short x max_long; raise ImageError if unreadable.
    (The caption job uses autolabel.prepare.prepare_for_model; this is the model-agnostic limit.)

    `min_short` is the short side the model really needs (its processor's input size, e.g. 336
    for LLaVA-1.5): JPEGs are DCT-decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    keeps the short side >= min_short, and only resized further if that is still over the
    max_short/max_long limits. Default: max_short (decode at >= the limit size, then resize).
    """
    decoded = decode_image(data, draft_short=min(min_short or max_short, max_short), max_pixels=max_pixels)
    im = decoded.image
    tw, th = target_size(*im.size, max_short, max_long)
    if im.size != (tw, th):
        im = im.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
    return Prepared(im, decoded.width, decoded.height)


def prepare_image_naive(data: bytes, max_short: int = 400, max_long: int = 800) -> Image.Image:
    """The reference way (benchmarks only): open, full decode, convert, resize."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return im.resize(target_size(*im.size, max_short, max_long), Image.Resampling.BICUBIC)
