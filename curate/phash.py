"""The `phash` scorer: a 64-bit perceptual hash per image (pHash, as the imagehash package
computes it), the input of the perceptual-duplicate pass (curate.phash_groups).

pHash: the grey image resized to 32 x 32 (Lanczos), its 2-D DCT-II, the top-left 8 x 8 block
of low frequencies, one bit per coefficient: above the block's median. Bit 63 is the block's
first coefficient (row-major order), so the hash's hex digits are imagehash's `str(phash(image))`.
imagehash is used when installed; otherwise the same computation in numpy (a DCT matrix:
the bits are the same, since scaling the DCT does not move a coefficient across the median).
Recompressed and resized copies of an image keep almost all bits; other images differ in ~32.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

HASH_SIZE = 8  # bits per side of the low-frequency block: 64-bit hashes
SIDE = 4 * HASH_SIZE  # the side the image is resized to (imagehash's highfreq_factor 4)
_WEIGHTS = (np.uint64(1) << np.arange(HASH_SIZE * HASH_SIZE - 1, -1, -1, dtype=np.uint64))


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """The DCT-II matrix C, C[k, n] = cos(pi k (2n + 1) / 2N): C @ x is x's DCT up to a factor 2."""
    k, n = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    return np.cos(np.pi * k * (2 * n + 1) / (2 * SIDE))


def _imagehash():
    try:
        import imagehash
    except ImportError:
        return None
    return imagehash


def grey_pixels(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, SIDE, SIDE) float64: each image in grey, resized as pHash resizes it."""
    return np.stack([np.asarray(im.convert("L").resize((SIDE, SIDE), Image.LANCZOS), np.float64) for im in images])


def phash_bits(pixels: np.ndarray) -> np.ndarray:
    """(n, 64) bool: the pHash bits of (n, SIDE, SIDE) grey pixels, all images at once."""
    c = _dct_matrix()
    low = (c @ pixels @ c.T)[:, :HASH_SIZE, :HASH_SIZE].reshape(len(pixels), -1)
    return low > np.median(low, axis=1, keepdims=True)


def phashes(images: Sequence[Image.Image]) -> np.ndarray:
    """uint64 pHash of each image (imagehash's when installed, else the numpy DCT's)."""
    if not images:
        return np.zeros(0, np.uint64)
    ih = _imagehash()
    if ih is not None:
        return np.array([int(str(ih.phash(im)), 16) for im in images], np.uint64)
    bits = phash_bits(grey_pixels(images)).astype(np.uint64)
    return (bits * _WEIGHTS).sum(axis=1, dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes, elementwise."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
