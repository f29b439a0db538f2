"""The synthetic shape world: one coloured shape on a neutral background, a pure function of a seed.

It stands in for SA-1B in the demo and the tests: the truth about every image is known
(`tiny.judge` checks captions and generated images against it), and the (colour, shape,
position) triples of `is_heldout` never occur in the training split.

- scenes (`sample_scenes`), rendering (`render`, `degrade`), texts (`dense_caption`,
  `prompt_text`, LAION-like `alt_text`);
- on disk as SA-1B (`write_sam_folder`: `sa_<id>.jpg` + `.json`, plus `alt_texts.parquet` and the
  ground truth `scenes.jsonl`) or as caption shards with embedded PNGs (`write_caption_shards`);
- the simple world of the trainer's tests (`write_simple_world`): 3 colours x 2 shapes x 2
  positions, one large shape on plain white, captioned "a red circle on the left".
"""

from __future__ import annotations

import io
import json
import os
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


# The simple world: 3 colours x 2 shapes x 2 positions, one large shape on plain white. Its short
# captions ("a red circle on the left": 7 T5 tokens with </s>) fit the trainer tests' 16 tokens.
SIMPLE_OPTIONS: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue"),
    "shape": ("square", "circle"),
    "position": ("left", "right"),
}


def simple_scene(rng: np.random.Generator) -> Scene:
    """A scene of the simple world, drawn uniformly."""
    color, shape, position = (str(rng.choice(SIMPLE_OPTIONS[a])) for a in ("color", "shape", "position"))
    return Scene(color=color, shape=shape, position=position, size="large", background="white", background_style="plain",
                 dx=float(rng.uniform(-_JITTER, _JITTER)), dy=float(rng.uniform(-_JITTER, _JITTER)))  # fmt: skip

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


def short_caption(scene: Scene) -> str:
    """The simple world's caption: "a red circle on the left"."""
    return f"a {scene.color} {scene.shape} on the {scene.position}"


def simple_corpus() -> list[str]:
    """Every caption of the simple world (a vocabulary for the tiny T5)."""
    o = SIMPLE_OPTIONS
    return [f"a {c} {s} on the {p}" for c in o["color"] for s in o["shape"] for p in o["position"]]

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


def write_caption_shards(out_dir: str | Path, rows: Iterable[tuple[str, Scene, str]], size: int, model: str,
                         rows_per_shard: int = 512, seed: int = 0) -> list[str]:
    """Caption shards (shards.CAPTION_SCHEMA) of (key, scene, caption) rows, each scene rendered
    at `size` px as an embedded PNG; the writer id is the seed's. Returns the captions."""
    from shards import CaptionRow, ShardWriter

    writer = ShardWriter(out_dir, rows_per_shard=rows_per_shard, writer_id=f"{seed % 2**32:08x}")
    captions = []
    for key, scene, caption in rows:
        buf = io.BytesIO()
        render(scene, size).save(buf, format="PNG")
        captions.append(caption)
        writer.add(CaptionRow(key=key, caption=caption, width=size, height=size, image=buf.getvalue(), model=model))
    writer.close()
    return captions


def write_simple_world(out_dir: str | Path, n: int, size: int = 16, seed: int = 0, rows_per_shard: int = 256) -> list[str]:
    """Caption shards of `n` scenes of the simple world with their short captions. Returns the captions."""
    rng = np.random.default_rng(seed)
    scenes = [simple_scene(rng) for _ in range(n)]
    rows = ((f"simple-{i:06d}", scene, short_caption(scene)) for i, scene in enumerate(scenes))
    return write_caption_shards(out_dir, rows, size, "synthetic", rows_per_shard, seed)
