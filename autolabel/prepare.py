"""Image preparation for captioning: the shared decode policy (shards.images.decode: bomb guard,
JPEG draft decode, EXIF orientation, RGB), then a resize within max_short x max_long.

JPEG `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly, so a 1500x2250 SA-1B
image destined for 400x600 is never fully decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from autolabel.sizing import SizePolicy
from shards.images.decode import DEFAULT_MAX_PIXELS, ImageError, decode_image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageError", "Prepared", "prepare_for_model", "prepare_image", "prepare_image_naive", "target_size"]


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


def prepare_for_model(
    data: bytes, policy: SizePolicy, max_short: int | None = None, max_long: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Prepared:
    """Decode `data` straight to the size the model's processor will work from (`policy.target`,
    within max_short x max_long when given: the paper's 400/800); raise ImageError if unreadable.
    JPEGs are DCT-decoded at the smallest scale that still covers that size on both axes."""
    decoded = decode_image(data, draft_short=lambda w, h: policy.draft_short(w, h, max_short, max_long), max_pixels=max_pixels)
    im = decoded.image
    size = policy.target(decoded.width, decoded.height, max_short, max_long)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    return Prepared(im, decoded.width, decoded.height)


def prepare_image(
    data: bytes, max_short: int = 400, max_long: int = 800, max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short: int | None = None,
) -> Prepared:
    """Decode `data` into an RGB image within max_short x max_long; raise ImageError if unreadable.
    (The caption job uses `prepare_for_model`; this is the model-agnostic limit, used by curate.)

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
