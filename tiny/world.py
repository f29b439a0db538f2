"""A deterministic miniature world: one coloured shape on a neutral background.

It stands in for SA-1B in the demo and the tests, because here we know the truth about every
image. That makes three things measurable that are otherwise only eyeballed:

- a VLM captioner's captions (`parse_caption` + `score_captions`): did it name the right colour,
  shape and position?
- a text-to-image model's samples (`judge_image` + `score`): did it draw what the prompt asked?
- compositional generalisation: some (colour, shape, position) triples never occur in the
  training split (`is_heldout`), so a model that gets them right has composed, not memorised.

Everything is a pure function of a seed. On disk the world looks like SA-1B (`write_sam_folder`):
`sa_<id>.jpg` + `sa_<id>.json` (image info + alt-text, empty annotations), plus two files SA-1B lacks:
`alt_texts.parquet` (LAION-like noisy alt-texts, by key) and `scenes.jsonl` (the ground truth).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, about 60 degrees apart in hue and far from every (neutral) background, so
# they stay separable after JPEG, down-sampling to 16 px and a blurry generator.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 205, 20),
    "green": (30, 160, 50),
    "cyan": (20, 190, 210),
    "blue": (35, 60, 215),
    "purple": (150, 40, 185),
}
# Shapes are told apart by how they fill their bounding box (square 1.0, circle 0.79,
# cross 0.64, triangle 0.5) and where that fill sits.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Anchor (x, y) of each position, as fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Side of the object's bounding box, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.28, "large": 0.44}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 243),
    "light grey": (205, 205, 205),
    "beige": (228, 216, 190),
    "grey": (160, 160, 158),
}
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient", "textured")

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
OPTIONS: dict[str, Sequence[str]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
}
Split = Literal["train", "heldout", "any"]
# SA-1B-style ids: the held-out split is numbered apart so both can share one folder.
FIRST_ID = {"train": 1, "heldout": 1_000_001, "any": 2_000_001}
_JITTER = 0.04  # random offset of the object from its anchor, fraction of the side
_JUDGE_SIZE = 32  # judge_image works at most at this resolution
_SUPERSAMPLE = 4  # draw at 4x and down-sample: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """One image of the world: everything needed to render it and to describe it truthfully."""

    color: str
    shape: str
    position: str
    size: str
    background: str
    background_style: str
    dx: float = 0.0  # offset from the position's anchor, fraction of the image side
    dy: float = 0.0
    texture_seed: int = 0  # seeds the background texture / gradient direction
    quality: str = "high"  # "low": blurred, grainy and saved as a heavy JPEG (the aesthetic axis)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def is_heldout(color: str, shape: str, position: str) -> bool:
    """True for the (colour, shape, position) triples reserved for the held-out split.

    A Latin-square rule: exactly one colour in six per (shape, position), so every pair of
    attributes (red+circle, red+left, circle+left) still occurs in training; only the triple
    is new. 20 of the 120 triples are held out.
    """
    c = list(COLORS).index(color)
    s = SHAPES.index(shape)
    p = list(POSITIONS).index(position)
    return (c + s + p) % len(COLORS) == 0


def sample_scene(rng: np.random.Generator, split: Split = "train") -> Scene:
    """Draw a scene uniformly over the attributes, restricted to `split`'s triples."""
    if split not in FIRST_ID:
        raise ValueError(f"split must be train, heldout or any, not {split!r}")
    while True:
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        position = str(rng.choice(list(POSITIONS)))
        if split == "any" or is_heldout(color, shape, position) == (split == "heldout"):
            break
    return Scene(
        color=color,
        shape=shape,
        position=position,
        size=str(rng.choice(list(SIZES))),
        background=str(rng.choice(list(BACKGROUNDS))),
        background_style=str(rng.choice(BACKGROUND_STYLES)),
        dx=float(rng.uniform(-_JITTER, _JITTER)),
        dy=float(rng.uniform(-_JITTER, _JITTER)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_scenes(n: int, seed: int, split: Split = "train") -> list[Scene]:
    """`n` scenes, a pure function of (seed, split); scene i does not depend on n."""
    root = np.random.SeedSequence([seed, list(FIRST_ID).index(split)])
    return [sample_scene(np.random.default_rng(s), split) for s in root.spawn(n)]


# --- rendering ---------------------------------------------------------------------------------


def _background(scene: Scene, size: int) -> np.ndarray:
    rng = np.random.default_rng(scene.texture_seed)
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.background_style == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
        ramp = np.cos(angle) * xx + np.sin(angle) * yy  # in [-0.71, 0.71]
        img += (36.0 * ramp)[..., None]
    elif scene.background_style == "textured":
        # soft blotches (low-res noise, up-sampled) plus fine grain
        coarse = rng.normal(0, 1, (6, 6)).astype(np.float32)
        blotch = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
        img += (7.0 * blotch)[..., None] + rng.normal(0, 3.0, (size, size, 1))
    return np.clip(img, 0, 255)


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` with bounding box `side` x `side` centred on (cx, cy); None for a circle."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up, base down, fills half its box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":  # a plus sign with arms 0.4 of the side wide
        a = 0.2 * side
        return [
            (cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a),
            (cx + h, cy + a), (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h),
            (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` on a `size` x `size` grid (coordinates in pixels)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(shape, cx * ss, cy * ss, side * ss)
    if poly is None:
        h = side * ss / 2
        draw.ellipse([cx * ss - h, cy * ss - h, cx * ss + h, cy * ss + h], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


def object_box(scene: Scene, size: int) -> tuple[float, float, float]:
    """(cx, cy, side) of the scene's object in pixels of a `size` image."""
    ax, ay = POSITIONS[scene.position]
    return (ax + scene.dx) * size, (ay + scene.dy) * size, SIZES[scene.size] * size


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render `scene` as a `size` x `size` RGB image (anti-aliased)."""
    bg = _background(scene, size)
    alpha = shape_mask(scene.shape, *object_box(scene, size), size)[..., None]
    color = np.array(COLORS[scene.color], np.float32)
    img = bg * (1 - alpha) + color * alpha
    out = Image.fromarray(np.round(img).astype(np.uint8), mode="RGB")
    return degrade(out, scene.texture_seed) if scene.quality == "low" else out


LOW_QUALITY_JPEG = 12  # JPEG quality a low-quality scene is saved at (blocking artefacts)


def degrade(img: Image.Image, seed: int) -> Image.Image:
    """A low-quality version of `img`: out of focus (Gaussian blur) and grainy (sensor noise)."""
    from PIL import ImageFilter

    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=img.size[0] / 14)), np.float32)
    grain = np.random.default_rng([seed, 3]).normal(0, 22.0, blurred.shape)
    return Image.fromarray(np.clip(np.round(blurred + grain), 0, 255).astype(np.uint8), mode="RGB")


def with_low_quality(scenes: Sequence[Scene], fraction: float, seed: int) -> list[Scene]:
    """`scenes` with about `fraction` of them marked low quality, chosen by their own rng (so the
    scenes themselves, and worlds written without a quality axis, are unchanged)."""
    import dataclasses

    rng = np.random.default_rng([seed, 11])
    return [dataclasses.replace(s, quality="low") if rng.uniform() < fraction else s for s in scenes]


# --- text ----------------------------------------------------------------------------------------

_POSITION_PHRASE = {
    "left": "on the left of the image",
    "right": "on the right of the image",
    "top": "at the top of the image",
    "bottom": "at the bottom of the image",
    "center": "in the center of the image",
}


def dense_caption(scene: Scene) -> str:
    """A truthful dense caption (what a good VLM should write), one fixed template.

    Example: "A large red circle on the left of the image, on a light grey textured background.
    The red circle is the only object in this simple flat illustration."
    """
    style = "" if scene.background_style == "plain" else f" {scene.background_style}"
    plain = "plain " if scene.background_style == "plain" else ""
    return (
        f"A {scene.size} {scene.color} {scene.shape} {_POSITION_PHRASE[scene.position]}, "
        f"on a {plain}{scene.background}{style} background. "
        f"The {scene.color} {scene.shape} is the only object in this simple flat illustration."
    )


def prompt_text(scene: Scene) -> str:
    """The short text-to-image prompt for a scene: the first sentence of its dense caption."""
    return dense_caption(scene).split(". ")[0] + "."


_ALT_NOISE = (
    "nice picture", "wallpaper hd", "untitled", "abstract background", "stock photo",
    "minimalist art print", "simple background texture", "free download", "image",
    "geometric pattern", "flat design", "poster", "photo", "screenshot", "new post",
)  # fmt: skip


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """A LAION-like alt-text: short, noisy and usually missing the object.

    About 45% say nothing about the object (a generic phrase or a camera file name), 25% give
    the colour or shape alone, 20% both, 10% both with stock-site noise.
    """
    u = rng.uniform()
    if u < 0.30:
        return str(rng.choice(_ALT_NOISE))
    if u < 0.45:
        return str(rng.choice(["IMG_", "DSC", "DSC_", "P10", "image"])) + f"{int(rng.integers(0, 10000)):04d}" + str(
            rng.choice(["", ".jpg", ".JPG", ".png"])
        )
    if u < 0.58:
        return str(rng.choice([scene.color, f"{scene.color} background", f"{scene.color} color"]))
    if u < 0.70:
        return str(rng.choice([scene.shape, f"{scene.shape} icon", f"{scene.shape} png", f"free vector {scene.shape}"]))
    if u < 0.90:
        return f"{scene.color} {scene.shape}"
    return f"{scene.color} {scene.shape} {rng.choice(_ALT_NOISE)} - {rng.choice(['shutterstock', 'vector', 'clipart'])}"


_COLOR_WORDS = {c: c for c in COLORS} | {"violet": "purple", "magenta": "purple", "turquoise": "cyan", "teal": "cyan"}
_SHAPE_WORDS = {"circle": "circle", "disc": "circle", "disk": "circle", "round": "circle", "dot": "circle",
                "square": "square", "rectangle": "square", "box": "square",
                "triangle": "triangle", "triangular": "triangle",
                "cross": "cross", "plus": "cross"}  # fmt: skip
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                   "lower": "bottom", "center": "center", "centre": "center", "middle": "center"}  # fmt: skip
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}


def _first(words: list[str], vocab: dict[str, str]) -> str | None:
    for w in words:
        if w in vocab:
            return vocab[w]
    return None


def parse_caption(text: str | None) -> dict[str, str | None]:
    """Read colour, shape, position and size from a caption (a VLM's or a prompt).

    The first word naming each attribute wins (the world has one object, and captions name it
    first); words outside the vocabulary are ignored, a missing attribute is None. Plural forms
    ("circles") count.
    """
    words = re.findall(r"[a-z]+", (text or "").lower())
    words = [w[:-1] if w.endswith("s") and w[:-1] in _SHAPE_WORDS else w for w in words]
    # "top"/"left" inside "top left" would be one position; the world has no corners, so the
    # first position word is the answer.
    return {
        "color": _first(words, _COLOR_WORDS),
        "shape": _first(words, _SHAPE_WORDS),
        "position": _first(words, _POSITION_WORDS),
        "size": _first(words, _SIZE_WORDS),
    }


# --- the automatic checker for generated images -----------------------------------------------


def _fit_background(arr: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pixel background estimate, a plane a + b*x + c*y per channel fitted to the border,
    and the background's own noise level (texture, JPEG, a generator's grain).

    The border ring is mostly background (objects can touch it, gradients tilt it), so fit by
    least squares, drop the border pixels far from the fit and refit.
    """
    h, w, _ = arr.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h - 1, 1)
    ring = np.zeros((h, w), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    design = np.stack([np.ones_like(xx), xx, yy], -1)
    a, y = design[ring], arr[ring]
    keep = np.ones(len(a), bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        resid = np.linalg.norm(y - a @ coef, axis=1)
        cut = max(3.0 * np.median(resid[keep]), 12.0)
        new_keep = resid < cut
        if new_keep.sum() < len(a) // 3 or (new_keep == keep).all():
            break
        keep = new_keep
    noise = float(np.percentile(resid[keep], 95)) if keep.any() else 0.0
    return design @ coef, noise


def _object_weights(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft object coverage in [0, 1] and the background estimate."""
    bg, noise = _fit_background(arr)
    diff = np.linalg.norm(arr - bg, axis=-1)
    peak = np.percentile(diff, 99)
    if peak < max(20.0, 2 * noise):  # nothing stands out from the background
        return np.zeros_like(diff), bg
    core = diff[diff > 0.6 * peak].mean()  # the object's own contrast (its interior)
    # alpha blending makes diff = coverage * contrast; the background's noise is taken off
    floor = min(noise, 0.3 * core)
    return np.clip((diff - floor) / (core - floor), 0, 1), bg


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 0.64}
# centroid minus box centre, in units of the side (a triangle's mass sits low)
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0}


def _fit_shape(shape: str, wts: np.ndarray, area: float, cx: float, cy: float) -> tuple[float, float]:
    """(best soft IoU, its side in px) of `shape`'s template against the coverage `wts`."""
    side0 = float(np.sqrt(area / _FILL[shape]))
    by0 = cy - _CENTROID_DROP[shape] * side0
    best = (-1.0, side0)
    for scale in (0.9, 0.95, 1.0, 1.05, 1.1):
        for ox in (-0.5, 0.0, 0.5):
            for oy in (-0.5, 0.0, 0.5):
                t = shape_mask(shape, cx + ox, by0 + oy, side0 * scale, wts.shape[0])
                iou = float(np.minimum(t, wts).sum() / max(np.maximum(t, wts).sum(), 1e-6))
                best = max(best, (iou, side0 * scale))
    return best


def judge_image(img: Image.Image) -> dict[str, str | None | float]:
    """Read colour, position, shape and size off an image (generated or rendered).

    The object is whatever differs from the background (a plane fitted to the border). Colour:
    nearest palette colour to the mean of the object's core pixels. Position: nearest anchor
    to the coverage-weighted centroid. Shape: best soft IoU between the coverage and each
    shape's rendered template at the object's bounding box. Size: nearest box side to
    sqrt(area / shape fill). Returns None for everything when no object stands out.
    """
    img = img.convert("RGB")
    if max(img.size) > _JUDGE_SIZE:  # 32 px are enough for this world and keep the search cheap
        img = img.resize((_JUDGE_SIZE, _JUDGE_SIZE), Image.BOX)
    elif img.size[0] != img.size[1]:
        side = max(img.size)
        img = img.resize((side, side), Image.BOX)
    arr = np.asarray(img, np.float32)
    size_px = arr.shape[0]
    wts, _ = _object_weights(arr)
    total = wts.sum()
    if total < 1e-3:
        return {"color": None, "shape": None, "position": None, "size": None, "coverage": 0.0}
    core = wts > 0.5
    mean_rgb = (arr[core].mean(0) if core.any() else (arr * wts[..., None]).sum((0, 1)) / total)
    color = min(COLORS, key=lambda c: float(np.sum((mean_rgb - np.array(COLORS[c])) ** 2)))

    h, w = wts.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((xx * wts).sum() / total), float((yy * wts).sum() / total)
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * w - cx) ** 2 + (POSITIONS[p][1] * h - cy) ** 2)

    # Each shape's best fit: start from the box its area and centroid imply, then search
    # small changes of side and offset; the shape whose template matches best wins.
    fits = {s: _fit_shape(s, wts, total, cx, cy) for s in SHAPES}
    shape = max(fits, key=lambda s: fits[s][0])
    size = min(SIZES, key=lambda k: abs(SIZES[k] * size_px - fits[shape][1]))
    return {"color": color, "shape": shape, "position": position, "size": size, "coverage": float(total / (h * w))}


def _accuracy(pairs: list[tuple[dict, dict]], attributes: Iterable[str]) -> dict:
    n = len(pairs)
    out: dict = {"n": n}
    for a in attributes:
        correct = sum(truth[a] == got.get(a) for truth, got in pairs)
        out[a] = {"accuracy": correct / n if n else float("nan"), "chance": 1 / len(OPTIONS[a]), "correct": correct}
    all_correct = sum(all(truth[a] == got.get(a) for a in ATTRIBUTES) for truth, got in pairs)
    chance_all = float(np.prod([1 / len(OPTIONS[a]) for a in ATTRIBUTES]))
    out["all"] = {"accuracy": all_correct / n if n else float("nan"), "chance": chance_all, "correct": all_correct}
    return out


def score(samples: Sequence[tuple[Scene, Image.Image]], attributes: Sequence[str] = (*ATTRIBUTES, "size")) -> dict:
    """How often generated images show what their prompt's scene asked for, judged by `judge_image`.

    Returns {"n", <attribute>: {"accuracy", "chance", "correct"}, "all": colour, shape and
    position all right}. Chance = 1 / number of options (product of them for "all").
    """
    pairs = [(scene.to_dict(), judge_image(img)) for scene, img in samples]
    return _accuracy(pairs, attributes)


def score_captions(samples: Sequence[tuple[Scene, str]], attributes: Sequence[str] = (*ATTRIBUTES, "size")) -> dict:
    """How often captions name the scene's colour, shape, position (and size), via `parse_caption`.

    Same result layout as `score`.
    """
    pairs = [(scene.to_dict(), parse_caption(text)) for scene, text in samples]
    return _accuracy(pairs, attributes)


# --- on disk: SA-1B layout ------------------------------------------------------------------------


def write_sam_folder(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    split: Split = "train",
    jpeg_quality: int = 92,
    meta_dir: str | Path | None = None,
    low_quality: float = 0.0,
) -> list[Scene]:
    """Write `n` scenes of `split` as an SA-1B-style folder and return them.

    Files: `sa_<id>.jpg` and `sa_<id>.json` (`{"image": {"image_id", "width", "height",
    "file_name", "alt_text"}, "annotations": []}`: SA-1B's sidecar minus masks, plus the
    alt-text SA-1B lacks, where a caption job reading sidecars can pick it up), `alt_texts.parquet` (columns
    key = "sa_<id>", file_name, image_id, alt_text) and `scenes.jsonl` (one line per image:
    key, file_name, image_id, split, the Scene fields, dense_caption, alt_text). Ids start at
    FIRST_ID[split], so train and held-out folders can be merged. Same arguments, same bytes.
    `meta_dir` puts the two ground-truth files elsewhere (keeps the image folder a pure SA-1B
    source for `t2i-data caption`); each record's `image` is the image path relative to it.
    `low_quality`: the fraction of scenes rendered low quality (`degrade`, saved at JPEG quality
    LOW_QUALITY_JPEG); each record's `quality` says which. 0 (default) writes the same bytes as before.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = Path(meta_dir) if meta_dir is not None else out
    meta.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(n, seed, split)
    if low_quality > 0:
        scenes = with_low_quality(scenes, low_quality, seed)
    alt_rng = np.random.default_rng([seed, list(FIRST_ID).index(split), 7])
    records = []
    for i, scene in enumerate(scenes):
        image_id = FIRST_ID[split] + i
        key = f"sa_{image_id}"
        alt = alt_text(scene, alt_rng)
        quality = LOW_QUALITY_JPEG if scene.quality == "low" else jpeg_quality
        render(scene, image_size).save(out / f"{key}.jpg", quality=quality)
        info = {"image_id": image_id, "width": image_size, "height": image_size, "file_name": f"{key}.jpg", "alt_text": alt}
        (out / f"{key}.json").write_text(json.dumps({"image": info, "annotations": []}))
        records.append(
            {"key": key, "file_name": f"{key}.jpg", "image": os.path.relpath(out / f"{key}.jpg", meta),
             "image_id": image_id, "split": split, **scene.to_dict(),
             "dense_caption": dense_caption(scene), "alt_text": alt}
        )  # fmt: skip
    table = pa.table({c: [r[c] for r in records] for c in ("key", "file_name", "image_id", "alt_text")})
    pq.write_table(table, meta / "alt_texts.parquet")
    (meta / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return scenes


def read_scenes(world_dir: str | Path) -> list[tuple[dict, Scene]]:
    """The ground truth of a folder written by `write_sam_folder`: (record, Scene) per image."""
    path = Path(world_dir) / "scenes.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write the world first (tiny.world.write_sam_folder)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r, Scene.from_dict(r)) for r in rows]
