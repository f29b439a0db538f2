"""The world's ground-truth checker: what a caption names and what an image shows.

- a VLM captioner's captions (`parse_caption` + `score_captions`): did it name the right colour,
  shape and position?
- a text-to-image model's samples (`judge_image` + `score`): did it draw what the prompt asked?

Both score against the `Scene` each image was rendered from (tiny.world), per attribute and
against chance.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from tiny.world import ATTRIBUTES, COLORS, OPTIONS, POSITIONS, SHAPES, SIZES, Scene, shape_mask

_JUDGE_SIZE = 32  # judge_image works at most at this resolution

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


def answer_question(question: str, judged: dict) -> bool:
    """The world's exact answer to a yes/no question about an image whose reading is `judged`
    (`judge_image`'s): yes when every colour, shape, position and size the question names is the
    one the image shows (a question naming none is never yes)."""
    named = {k: v for k, v in parse_caption(question).items() if v is not None}
    return bool(named) and all(judged.get(k) == v for k, v in named.items())
