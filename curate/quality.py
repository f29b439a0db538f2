"""The `image` scorer: resolution, aspect ratio, blur, JPEG quality estimate, file size."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

# The IJG (libjpeg) standard luminance table at quality 50, in natural (row-major) order.
# One OpenCV thread: the images are small, and the score job already decodes in parallel
# threads; OpenCV's own pool on top only oversubscribes the cores.
cv2.setNumThreads(1)

_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], np.float64)  # fmt: skip


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image: low means blurry (Pech-Pacheco et al. 2000)."""
    grey = np.asarray(image.convert("L"))
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def jpeg_quality(data: bytes) -> int | None:
    """The IJG quality (1-100) the JPEG was most likely saved at, from its luminance
    quantisation table (inverting libjpeg's scaling); None for other formats."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            tables = getattr(im, "quantization", None) if im.format == "JPEG" else None
    except Exception:  # noqa: BLE001 - the decode path reports unreadable files
        return None
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    # PIL gives the table in natural order; scale = mean percentage against the standard table,
    # over entries not clipped at 255 (baseline JPEG's limit at low qualities)
    table = np.asarray(tables[0], np.float64)
    kept = table < 255
    scale = float(np.mean(table[kept] * 100.0 / _IJG_LUMA[kept])) if kept.any() else 5000.0
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(np.clip(round(quality), 1, 100))


def image_stats(data: bytes, image: Image.Image, width: int, height: int) -> dict:
    """The `image` scorer's columns for one decoded image (blur on the decoded size)."""
    return {
        "width": width,
        "height": height,
        "aspect": width / height if height else None,
        "blur": laplacian_variance(image),
        "jpeg_quality": jpeg_quality(data),
        "file_bytes": len(data),
    }
