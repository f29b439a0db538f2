"""Image preparation for captioning: the shared decode policy (shards.images.decode: bomb guard,
JPEG draft decode, EXIF orientation, RGB), then a resize within max_short x max_long.

JPEG `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly, so a 1500x2250 SA-1B
image destined for 400x600 is never fully decoded.

The caption job's one resize (`resize_as_processor`) is the processor's own: torchvision's
antialiased uint8 resize with the processor's filter, which is what transformers' image
processors run. The processor then finds the image at its size and skips its resize, so the
pixel values it makes equal those it would make from the draft-decoded image itself (within a
few levels where it also makes a whole-image thumbnail: tests/test_size_policy.py); and the
uint8 SIMD kernel is 4-5x faster than PIL's resize (375x563 -> 336x504: ~0.6-1.2 ms against
~2.9-4.7 ms; BENCHMARKS.md caption_bench). It reads PIL's pixel memory in place (Arrow export) where
Pillow offers it.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from autolabel.sizing import SizePolicy
from shards.images.decode import DEFAULT_MAX_PIXELS, decode_image
from shards.images.fit import Prepared


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
    return Prepared(resize_as_processor(im, size, policy.resample), decoded.width, decoded.height)


# PIL filter codes -> torchvision's, as transformers maps them (image_utils.pil_torch_interpolation_mapping),
# for the filters torchvision resizes natively in uint8 with antialiasing
_TORCH_FILTERS = {1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC"}


def resize_as_processor(im: Image.Image, size: tuple[int, int], resample: int = 3) -> Image.Image:
    """`im` (RGB) resized to `size` (width, height) the way a transformers image processor
    resizes: torchvision's antialiased resize of the uint8 tensor with filter `resample` (a PIL
    code). PIL's resize where torchvision is missing or has no such filter (within 1 level)."""
    if im.size == size:
        return im
    tv = _torchvision()
    if tv is None or resample not in _TORCH_FILTERS:
        return im.resize(size, resample, reducing_gap=None)
    torch, tvF, modes = tv
    rgbx = _rgbx_view(im, torch)
    chw = rgbx if rgbx is not None else torch.from_numpy(np.array(im)).permute(2, 0, 1)  # HWC viewed as channels-last
    out = tvF.resize(chw, [size[1], size[0]], interpolation=modes[_TORCH_FILTERS[resample]], antialias=True)
    hwc = out.permute(1, 2, 0).numpy()  # channels-last in, channels-last out: no copy
    return Image.frombytes("RGB", size, hwc, "raw", "RGBX") if rgbx is not None else Image.fromarray(hwc)


def _rgbx_view(im: Image.Image, torch):
    """`im`'s own pixel memory (PIL keeps RGB as RGBX, 4 bytes a pixel) as a (4, H, W) channels-last
    uint8 tensor, without a copy (Pillow's Arrow export); None where that is unavailable (older
    Pillow, an image in several memory blocks). Each channel resizes on its own, so the padding
    channel changes nothing, and the uint8 kernel works on 4 channels natively."""
    import pyarrow as pa

    if im.mode != "RGB":
        return None
    try:
        pixels = pa.array(im)
    except (TypeError, ValueError, AttributeError, pa.ArrowException):
        return None
    kind = pixels.type
    if not (pa.types.is_fixed_size_list(kind) and kind.list_size == 4 and kind.value_type == pa.uint8()):
        return None
    w, h = im.size
    return torch.from_dlpack(pixels.values).view(h, w, 4).permute(2, 0, 1)


@functools.cache
def _torchvision():
    """(torch, torchvision's functional transforms, InterpolationMode), or None if unusable."""
    try:
        import torch
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF
    except (ImportError, OSError, RuntimeError):  # absent, or a wheel built for another torch
        return None
    return torch, tvF, InterpolationMode
