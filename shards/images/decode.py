"""The one decode policy for every job that looks at pixels (caption and features).

    decode_image(data, draft_short=336) -> Decoded(image RGB, width, height)

1. Bomb guard: the header's size is checked against `max_pixels` (default 89,478,485, PIL's own
   warning limit, ~9.5k x 9.5k) before any pixel is decoded; over it -> ImageError.
2. Draft decode (JPEG only, optional): libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 scale,
   never below the short side the caller needs, so a 1500x2250 SA-1B photo meant for 256 px is
   never fully decoded.
3. EXIF orientation is applied (`ImageOps.exif_transpose`): every job sees the image upright.
4. RGB: CMYK, 16-bit, float, palette, alpha (composited onto white) all become 8-bit RGB.

Animated images give their first frame. Only truly unreadable input raises ImageError, whose
message is what the jobs record in their `error` fields.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own DecompressionBombWarning limit
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(Exception):
    """The input is not a readable image; the message is recorded in the row's `error`."""


@dataclass
class Decoded:
    image: Image.Image  # RGB, upright; at least the size draft_short asked for (or full size)
    width: int  # original size, after EXIF orientation
    height: int


DraftShort = int | Callable[[int, int], int] | None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (alpha composited onto white, 16-bit scaled, float stretched)."""
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


def _draft(im: Image.Image, short: int) -> None:
    """Ask libjpeg to decode at the smallest DCT scale whose short side is still >= `short`."""
    w, h = im.size
    scale = min(1.0, short / min(w, h))
    im.draft(im.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))


def decode_image(data: bytes, draft_short: DraftShort = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode `data` under the policy above; raise ImageError if it is not a usable image.

    `draft_short`: the short side the caller needs (JPEGs then decode at the smallest DCT scale
    that keeps it), or a function of the upright (width, height) that returns it (features need
    the size first to pick their bucket); None decodes at full size.
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
                im.seek(0)  # animated: the first frame
            ow, oh = (h, w) if im.getexif().get(0x0112, 1) in _ROTATED else (w, h)
            short = draft_short(ow, oh) if callable(draft_short) else draft_short
            if short and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
                _draft(im, short)  # libjpeg DCT scaling: decode at >= that size, not full size
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: otherwise an upright image is copied whole
            im = to_rgb(im)
            return Decoded(im, ow, oh)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Exception as e:  # UnidentifiedImageError, truncated data, broken headers, ...
        raise ImageError(f"{type(e).__name__}: {e}") from None
