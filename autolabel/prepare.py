"""Image preparation: decode near the target size, orient, convert to RGB, refuse bombs.

JPEG `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly, so a 1500x2250 SA-1B
image destined for 400x600 is never fully decoded. Readable-but-unusual images (CMYK, 16-bit,
alpha, palette, animated) become RGB; only truly unreadable input raises ImageError.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bomb limit


class ImageError(Exception):
    """The input is not a readable image; the message is recorded in the row's `error`."""


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


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
        return Image.fromarray((a * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # alpha onto white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV


def prepare_image(
    data: bytes, max_short: int = 400, max_long: int = 800, max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short: int | None = None,
) -> Prepared:
    """Decode `data` into an RGB image within max_short x max_long; raise ImageError if unreadable.

    `min_short` is the short side the model really needs (its processor's input size, e.g. 336
    for LLaVA-1.5): JPEGs are DCT-decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    keeps the short side >= min_short, and only resized further if that is still over the
    max_short/max_long limits. Default: max_short (decode at >= the limit size, then resize).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated: caption the first frame
            orientation = im.getexif().get(0x0112, 1)
            ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
            if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
                need = min(min_short or max_short, max_short)
                dw, dh = target_size(w, h, need, max(w, h))  # stored orientation; short side >= need
                im.draft(im.mode, (dw, dh))  # libjpeg DCT scaling: decode at >= that size, not full size
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            tw, th = target_size(*im.size, max_short, max_long)
            if im.size != (tw, th):
                im = im.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=None)
            return Prepared(im, ow, oh)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, broken headers, ...
        raise ImageError(f"{type(e).__name__}: {e}") from None


def prepare_image_naive(data: bytes, max_short: int = 400, max_long: int = 800) -> Image.Image:
    """The reference way (benchmarks only): open, full decode, convert, resize."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return im.resize(target_size(*im.size, max_short, max_long), Image.Resampling.BICUBIC)
