"""How big an image a VLM's processor really works from, read from the processor itself, so the
caption job decodes and resizes each image once, straight to that size.

    policy = size_policy(processor, max_pixels=None, min_pixels=None) -> SizePolicy
    policy.target(width, height, max_short=None, max_long=None) -> (w, h)   # what to prepare

Families and what their processors do with a W x H image (transformers 5.19):

| kind | processors | the processor resizes to |
|---|---|---|
| short_side | CLIP (LLaVA-1.5) | short side `shortest_edge` (aspect kept), then a centre crop |
| canvas | SigLIP (PaliGemma, Gemma 3), GotOcr2 (InternVL3, tiles) | exactly height x width; InternVL3 with `crop_to_patches`: the tile grid closest to the aspect ratio, times the tile |
| grid | LLaVA-NeXT, LLaVA-OneVision (anyres) | inside the best `image_grid_pinpoints` resolution (aspect kept), then tiles |
| pixels | Qwen2-VL, Qwen2.5-VL, Qwen3-VL | `smart_resize`: sides multiples of patch x merge, pixels within [min_pixels, max_pixels]; `shortest_edge` / `longest_edge` are those pixel counts |
| long_side | Idefics3, SmolVLM | long side `longest_edge` (aspect kept, up or down), then tiles of `max_image_size` |
| none | anything else | unknown: the paper's 400/800 limit |

`target` never upscales (the processor upscales small images itself, the same either way), and
applies the paper's limit (`max_short` / `max_long`, e.g. 400 / 800) first when one is given, as
the processor would then see the limited image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Qwen's processors allow up to 12.8 M pixels (thousands of tokens for a 1500x2250 SA-1B image).
# Unless --max-pixels says otherwise, the job caps them at LLaVA-1.5's 576 tokens' worth for
# Qwen2-VL's 28-px token grid (Qwen3-VL's 32 px: 441 tokens).
DEFAULT_MAX_PIXELS = 576 * 28 * 28
PAPER_LIMIT = (400, 800)


@dataclass(frozen=True)
class SizePolicy:
    kind: str  # short_side | canvas | grid | pixels | long_side | none
    why: str
    side: int | None = None  # short_side: the short side; long_side: the long side
    canvas: tuple[int, int] | None = None  # canvas: (width, height) of one tile / the fixed size
    tiles: tuple[int, int] | None = None  # canvas with crop_to_patches: (min, max) tiles
    pinpoints: list = field(default_factory=list)  # grid: [[height, width], ...]
    factor: int | None = None  # pixels: sides are multiples of this (patch x merge)
    min_pixels: int | None = None
    max_pixels: int | None = None
    resample: int = 3  # the processor's filter (PIL code: 3 bicubic, 2 bilinear, 1 lanczos): ours resizes with it

    def target(self, width: int, height: int, max_short: int | None = None, max_long: int | None = None) -> tuple[int, int]:
        """The size to prepare a width x height image at: what the processor will work from."""
        if max_short or max_long or self.kind == "none":
            width, height = limited(width, height, *((max_short, max_long) if (max_short or max_long) else PAPER_LIMIT))
        tw, th = self._processor_size(width, height)
        return min(tw, width), min(th, height)  # never upscale

    def _processor_size(self, w: int, h: int) -> tuple[int, int]:
        if self.kind == "short_side":
            return _scaled(w, h, self.side / min(w, h))
        if self.kind == "long_side":
            return _scaled(w, h, self.side / max(w, h))
        if self.kind == "grid":
            from transformers.image_processing_utils import select_best_resolution

            ph, pw = select_best_resolution((h, w), self.pinpoints)
            # as the processor sizes it (image_processing_utils.get_patch_output_size): the short
            # way rounded up, so 1500x2250 in 672x672 is 449 px wide (float 448.00000000000006)
            if pw / w < ph / h:
                return pw, min(math.ceil(h * (pw / w)), ph)
            return min(math.ceil(w * (ph / h)), pw), ph
        if self.kind == "canvas":
            cw, ch = self.canvas
            if self.tiles:
                from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

                cols, rows = get_optimal_tiled_canvas((h, w), (ch, cw), *self.tiles)
                cw, ch = cw * cols, ch * rows
            return cw, ch
        if self.kind == "pixels":
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            th, tw = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
            return tw, th
        return w, h

    def draft_short(self, width: int, height: int, max_short: int | None = None, max_long: int | None = None) -> int:
        """The short side JPEG draft decoding must keep so the image covers `target` on both axes."""
        tw, th = self.target(width, height, max_short, max_long)
        return math.ceil(max(tw / width, th / height) * min(width, height) - 1e-6)  # no float round-up past the size


def limited(width: int, height: int, max_short: int | None, max_long: int | None) -> tuple[int, int]:
    """Largest same-aspect size with short <= max_short and long <= max_long (never upscales)."""
    scale = min(1.0, (max_short or math.inf) / min(width, height), (max_long or math.inf) / max(width, height))
    return _scaled(width, height, scale)


def _scaled(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, round(w * scale)), max(1, round(h * scale))


def size_fields(size) -> dict:
    """A processor's size as a plain dict: transformers' `SizeDict` (unset fields dropped), a
    dict, or an int (older processors: one side length)."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    try:
        return dict(size)  # SizeDict iterates over its set (key, value) pairs
    except (TypeError, ValueError):
        return {}


def is_pixel_count(image_processor) -> bool:
    """Qwen-VL style: `size` holds min/max pixel counts, not side lengths."""
    size = size_fields(getattr(image_processor, "size", None))
    return "min_pixels" in size or "max_pixels" in size or (hasattr(image_processor, "merge_size") and "longest_edge" in size)


def size_policy(processor, max_pixels: int | None = None, min_pixels: int | None = None) -> SizePolicy:
    """The SizePolicy of `processor` (a processor or an image processor). `max_pixels` /
    `min_pixels` replace a pixel-count processor's own (apply them with `set_pixel_limits`)."""
    ip = getattr(processor, "image_processor", processor)
    if ip is None:
        return SizePolicy("none", "no image processor: the 400/800 limit")
    return replace(_size_policy(ip, max_pixels, min_pixels), resample=_resample_code(ip))


def _resample_code(ip) -> int:
    """The processor's resize filter as a PIL code (bicubic when it names none)."""
    code = getattr(ip, "resample", None)
    return int(code) if isinstance(code, int) else 3


def _size_policy(ip, max_pixels: int | None, min_pixels: int | None) -> SizePolicy:
    size, crop = size_fields(getattr(ip, "size", None)), size_fields(getattr(ip, "crop_size", None))
    if is_pixel_count(ip):
        lo = min_pixels or size.get("min_pixels") or size.get("shortest_edge") or getattr(ip, "min_pixels", None)
        hi = max_pixels or size.get("max_pixels") or size.get("longest_edge") or getattr(ip, "max_pixels", None)
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
        return SizePolicy("pixels", f"pixel-count processor: {lo}..{hi} pixels, sides multiples of {factor}",
                          factor=factor, min_pixels=int(lo), max_pixels=int(hi))  # fmt: skip
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if pinpoints:
        return SizePolicy("grid", "anyres: inside the best image_grid_pinpoints resolution", pinpoints=[list(p) for p in pinpoints])
    if "height" in size and "width" in size:
        canvas = (int(size["width"]), int(size["height"]))
        if getattr(ip, "crop_to_patches", False):
            tiles = (int(ip.min_patches), int(ip.max_patches))
            return SizePolicy("canvas", f"tiles of {canvas[0]}x{canvas[1]}, {tiles[0]}..{tiles[1]} of them", canvas=canvas, tiles=tiles)
        return SizePolicy("canvas", f"fixed {canvas[0]}x{canvas[1]}", canvas=canvas)
    sides = [v for d in (size, crop) for k, v in d.items() if k in ("shortest_edge", "height", "width") and isinstance(v, int)]
    if sides:
        return SizePolicy("short_side", f"short side {max(sides)} (size {size or '-'}, crop_size {crop or '-'})", side=max(sides))
    if isinstance(size.get("longest_edge"), int):
        return SizePolicy("long_side", f"long side {size['longest_edge']} (longest edge only, then tiles)", side=size["longest_edge"])
    return SizePolicy("none", f"size {size or '-'} says nothing usable: the 400/800 limit")


def set_pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Make a pixel-count processor use these limits too (None keeps its own)."""
    ip = getattr(processor, "image_processor", processor)
    if not (min_pixels or max_pixels) or not is_pixel_count(ip):
        return
    size = size_fields(ip.size)
    new = {"shortest_edge": min_pixels or size.get("shortest_edge"), "longest_edge": max_pixels or size.get("longest_edge")}
    ip.size = type(ip.size)(**new) if not isinstance(ip.size, dict) else new


def pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int] | None:
    """(min_pixels, max_pixels) the job gives a pixel-count processor: the user's, else its own
    min and its own max capped at DEFAULT_MAX_PIXELS; None for other processors. A limit asked
    of a processor that sizes by sides is a UserError (it would be silently ignored)."""
    from shards.errors import UserError

    ip = getattr(processor, "image_processor", processor)
    if not is_pixel_count(ip):
        if min_pixels or max_pixels:
            raise UserError(f"--min-pixels/--max-pixels apply to pixel-count processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), "
                            f"not {type(ip).__name__}: drop them, or use --max-short/--max-long")  # fmt: skip
        return None
    own = size_policy(ip)
    hi = max_pixels or min(own.max_pixels, DEFAULT_MAX_PIXELS)
    lo = min_pixels or min(own.min_pixels, hi)
    if lo > hi:
        raise UserError(f"--min-pixels {lo} is above --max-pixels {hi}: pass min <= max")
    return lo, hi
