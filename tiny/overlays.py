"""Web artefacts drawn on the world's photos: stock-photo watermarks and text, with their ground
truth, for the `watermark` and `text` scorers' tiny models, tests and benchmarks.

- `add_watermark(image, rng)`: a semi-transparent stock-site mark ("© stockfoto" and the like),
  in rows across the image, as stock sites stamp their previews;
- `add_text(image, rng, words)`: one or two opaque strings of words and numbers (as memes, ads
  and screenshots carry) at random sizes, colours and places, some on a solid box, some
  outlined; the Overlay has the strings and their boxes, `text_mask` the boxes as a mask;
- `overlay_world(folder, ...)`: an SA-1B folder of world photos (tiny.world) where a share of
  the photos carry one kind of overlay; `overlays.jsonl` holds the truth per key.

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
# words of text overlays: the tiny text detector trains on TRAIN_WORDS, the tests judge it on
# HELDOUT_WORDS (and both on random letter/digit strings of their own seeds)
TRAIN_WORDS = ("sale", "best", "price", "hello", "happy", "new", "free", "buy", "now", "big", "summer", "deal",
               "love", "top", "shop", "open", "today", "cool", "win", "go", "menu", "news", "live", "off")  # fmt: skip
HELDOUT_WORDS = ("party", "offer", "click", "share", "vote", "night", "world", "music", "order", "gift", "only",
                 "club", "fresh", "week", "city", "join")  # fmt: skip


@dataclass
class Overlay:
    """What was drawn on one photo: its kind (`watermark`, `text` or "" for none), the text drawn
    (strings joined by a space) and its boxes (x0, y0, x1, y1) in pixels."""

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


def text_phrase(rng: np.random.Generator, words: tuple[str, ...] = TRAIN_WORDS) -> str:
    """One to three tokens: words of `words`, random letter strings, numbers ("sale 50%", "x7kq 2024")."""
    tokens = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.uniform()
        if kind < 0.5:
            tokens.append(str(rng.choice(words)))
        elif kind < 0.75:
            tokens.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789"), int(rng.integers(2, 7)))))
        else:
            tokens.append(rng.choice([f"{int(rng.integers(5, 100))}%", str(int(rng.integers(1, 3000))), f"${int(rng.integers(1, 500))}"]))
    phrase = " ".join(tokens)
    return phrase.upper() if rng.uniform() < 0.3 else phrase


def _contrasting(rng: np.random.Generator, luminance: float) -> tuple[int, int, int]:
    """A random colour whose luminance is far from `luminance` (0-255): text meant to be read."""
    while True:
        c = rng.integers(0, 256, 3)
        if abs(float(c @ (0.299, 0.587, 0.114)) - luminance) > 90:
            return int(c[0]), int(c[1]), int(c[2])


def _draw_string(img: Image.Image, phrase: str, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """Draw `phrase` at a random size and place (on a solid box or outlined in 45% of cases each); its box."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    f = font(max(8, int(h * rng.uniform(0.12, 0.24))))
    pad = int(rng.integers(1, 4)) if rng.uniform() < 0.45 else 0
    stroke = 1 if not pad and rng.uniform() < 0.45 else 0
    x0, y0, x1, y1 = draw.textbbox((0, 0), phrase, font=f, stroke_width=stroke)
    while x1 - x0 + 2 * pad > w - 2 and " " in phrase:  # too wide: drop the last word
        phrase = phrase.rsplit(" ", 1)[0]
        x0, y0, x1, y1 = draw.textbbox((0, 0), phrase, font=f, stroke_width=stroke)
    if x1 - x0 + 2 * pad > w:
        return None
    x = int(rng.integers(pad, max(pad + 1, w - (x1 - x0) - pad))) - x0
    y = int(rng.integers(pad, max(pad + 1, h - (y1 - y0) - pad))) - y0
    box = (max(0, x + x0 - pad), max(0, y + y0 - pad), min(w, x + x1 + pad), min(h, y + y1 + pad))
    under = np.asarray(img.crop(box).convert("L"), np.float32).mean()
    if pad:  # a solid box of a random colour under the text
        draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        under = np.asarray(img.crop(box).convert("L"), np.float32).mean()
    fill = _contrasting(rng, under)
    outline = (255, 255, 255) if sum(fill) < 384 else (0, 0, 0)
    draw.text((x, y), phrase, font=f, fill=fill, stroke_width=stroke, stroke_fill=outline)
    return box


def add_text(image: Image.Image, rng: np.random.Generator, words: tuple[str, ...] = TRAIN_WORDS) -> tuple[Image.Image, Overlay]:
    """`image` with one string of text (70%) or two; the Overlay has the strings and their boxes."""
    img = image.convert("RGB").copy()
    strings, boxes = [], []
    for _ in range(1 if rng.uniform() < 0.7 else 2):
        phrase = text_phrase(rng, words)
        box = _draw_string(img, phrase, rng)
        if box is not None:
            strings.append(phrase)
            boxes.append(box)
    return img, Overlay("text", " ".join(strings), boxes)


def text_mask(overlay_: Overlay, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 in {0, 1}: the union of the overlay's text boxes."""
    w, h = size
    mask = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in overlay_.boxes if overlay_.kind == "text" else []:
        mask[y0:y1, x0:x1] = 1.0
    return mask


def overlay(image: Image.Image, kind: str, rng: np.random.Generator, words: tuple[str, ...] = TRAIN_WORDS) -> tuple[Image.Image, Overlay]:
    """`image` with an overlay of `kind` (watermark | text | "": none); `words`: text's vocabulary."""
    if kind == "watermark":
        return add_watermark(image, rng)
    if kind == "text":
        return add_text(image, rng, words)
    if kind:
        raise ValueError(f"unknown overlay kind {kind!r}: use watermark or text")
    return image, Overlay()


def overlay_kinds(n: int, kind: str, fraction: float, seed: int) -> list[str]:
    """Which of `n` photos get an overlay of `kind`: exactly round(fraction * n) of them, chosen by `seed`."""
    chosen = np.random.default_rng([seed, 23]).permutation(n)[: int(round(fraction * n))]
    kinds = [""] * n
    for i in chosen:
        kinds[i] = kind
    return kinds


def overlay_world(folder: str | Path, n: int, kind: str, fraction: float = 0.2, seed: int = 0, size: int = 64,
                  low_quality: float = 0.3, split: W.Split = "any", words: tuple[str, ...] = HELDOUT_WORDS) -> dict[str, Overlay]:
    """An SA-1B folder of `n` world photos (tiny.world.write_sam_folder) where `fraction` of
    them carry an overlay of `kind`, redrawn in place; returns {key: Overlay} (also written to
    `overlays.jsonl`). `words`: text overlays' vocabulary (held out from the tiny detector's)."""
    folder = Path(folder)
    W.write_sam_folder(folder, n=n, seed=seed, image_size=size, split=split, low_quality=low_quality)
    truth: dict[str, Overlay] = {}
    records = W.read_scenes(folder)
    for (rec, scene), k in zip(records, overlay_kinds(len(records), kind, fraction, seed)):
        rng = np.random.default_rng([seed, int(rec["image_id"]), 29])
        path = folder / rec["file_name"]
        if k:
            img, truth[rec["key"]] = overlay(W.render(scene, size), k, rng, words)
            img.save(path, quality=W.LOW_QUALITY_JPEG if scene.quality == "low" else 92)
        else:
            truth[rec["key"]] = Overlay()
    (folder / "overlays.jsonl").write_text("".join(json.dumps({"key": k, **asdict(o)}) + "\n" for k, o in truth.items()))
    return truth

