"""Web artefacts drawn on the world's photos: stock-photo watermarks, with their ground truth, for
the `watermark` scorer's tiny models, tests and benchmarks.

- `add_watermark(image, rng)`: a semi-transparent stock-site mark ("© stockfoto" and the like),
  in rows across the image, as stock sites stamp their previews;
- `overlay_world(folder, ...)`: an SA-1B folder of world photos (tiny.world) where a share of
  the photos carry a watermark; `overlays.jsonl` holds the truth per key.

Everything is a pure function of its seed. Fonts: Pillow's bundled FreeType font (no file needed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tiny import world as W

WATERMARKS = ("© stockfoto", "© dreamstock", "© photobank", "© imagepro", "© picstore", "© shotbase")


@dataclass
class Overlay:
    """What was drawn on one photo: its kind (`watermark`, or "" for none), the mark's text and
    its boxes (x0, y0, x1, y1) in pixels."""

    kind: str = ""
    text: str = ""
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px."""
    return ImageFont.load_default(size)


def add_watermark(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, Overlay]:
    """`image` with a stock-site watermark: its name in white with a dark outline at 60-75%
    opacity, in two or three rows across the image (the way stock previews are stamped; the
    outline keeps it visible on light backgrounds at the tiny CLIP's 32 px input)."""
    img = image.convert("RGBA")
    w, h = img.size
    mark = str(rng.choice(WATERMARKS))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    f = font(max(8, int(h * rng.uniform(0.15, 0.2))))
    alpha = int(255 * rng.uniform(0.6, 0.75))
    boxes = []
    rows = int(rng.integers(2, 4))
    for r in range(rows):
        y = int((r + 0.5) * h / rows - f.size / 2 + rng.integers(-2, 3))
        x = int(rng.integers(-w // 4, w // 8))
        draw.text((x, y), mark, font=f, fill=(255, 255, 255, alpha), stroke_width=1, stroke_fill=(40, 40, 40, alpha))
        boxes.append(tuple(int(v) for v in draw.textbbox((x, y), mark, font=f)))
    return Image.alpha_composite(img, layer).convert("RGB"), Overlay("watermark", mark, boxes)


def overlay(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Overlay]:
    """`image` with an overlay of `kind` (watermark | "": none)."""
    if kind == "watermark":
        return add_watermark(image, rng)
    if kind:
        raise ValueError(f"unknown overlay kind {kind!r}: use watermark")
    return image, Overlay()


def overlay_kinds(n: int, kind: str, fraction: float, seed: int) -> list[str]:
    """Which of `n` photos get an overlay of `kind`: exactly round(fraction * n) of them, chosen by `seed`."""
    chosen = np.random.default_rng([seed, 23]).permutation(n)[: int(round(fraction * n))]
    kinds = [""] * n
    for i in chosen:
        kinds[i] = kind
    return kinds


def overlay_world(folder: str | Path, n: int, kind: str, fraction: float = 0.2, seed: int = 0, size: int = 64,
                  low_quality: float = 0.3, split: W.Split = "any") -> dict[str, Overlay]:
    """An SA-1B folder of `n` world photos (tiny.world.write_sam_folder) where `fraction` of
    them carry an overlay of `kind`, redrawn in place; returns {key: Overlay} (also written to
    `overlays.jsonl`)."""
    folder = Path(folder)
    W.write_sam_folder(folder, n=n, seed=seed, image_size=size, split=split, low_quality=low_quality)
    truth: dict[str, Overlay] = {}
    records = W.read_scenes(folder)
    for (rec, scene), k in zip(records, overlay_kinds(len(records), kind, fraction, seed)):
        rng = np.random.default_rng([seed, int(rec["image_id"]), 29])
        path = folder / rec["file_name"]
        if k:
            img, truth[rec["key"]] = overlay(W.render(scene, size), k, rng)
            img.save(path, quality=W.LOW_QUALITY_JPEG if scene.quality == "low" else 92)
        else:
            truth[rec["key"]] = Overlay()
    (folder / "overlays.jsonl").write_text("".join(json.dumps({"key": k, **asdict(o)}) + "\n" for k, o in truth.items()))
    return truth

