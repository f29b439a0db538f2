"""The tiny text detector the project fits itself, for the `text` scorer's tests, benchmarks and
the demo world: curate.text.TextNet fitted on the world's training photos (tiny.world, train
split, 30% low quality, saved as JPEG as the world saves them), half of them with text overlays
of TRAIN_WORDS and random strings (tiny.overlays.add_text), against the overlays' text boxes.
Deterministic for a seed on one torch thread; a couple of minutes on one CPU core.

    python -m tiny.text_detector OUT.safetensors [--n 1600] [--steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from curate.text import TextNet, fit_text_detector, save_text_detector
from tiny import world as W
from tiny.overlays import TRAIN_WORDS, Overlay, add_text, text_mask


def text_samples(n: int, seed: int, fraction: float = 0.5, size: int = 64, split: W.Split = "train",
                 words: tuple[str, ...] = TRAIN_WORDS) -> tuple[list[Image.Image], list[Overlay]]:
    """`n` world photos of `split`, `fraction` of them with text, JPEG round-tripped as the world
    saves them (quality 92, low-quality scenes W.LOW_QUALITY_JPEG); their overlays."""
    scenes = W.with_low_quality(W.sample_scenes(n, seed, split), 0.3, seed)
    images, truth = [], []
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, i, 41])
        img, o = add_text(W.render(scene, size), rng, words) if rng.uniform() < fraction else (W.render(scene, size), Overlay())
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=W.LOW_QUALITY_JPEG if scene.quality == "low" else 92)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        truth.append(o)
    return images, truth


def train_text_detector(out: str | Path, n: int = 1600, steps: int = 600, seed: int = 0) -> Path:
    """Fit the tiny detector on `n` training photos (half with text) and save it to `out`."""
    import torch

    torch.set_num_threads(1)
    images, truth = text_samples(n, seed)
    pixels = TextNet(images[0].size[0]).pixels(images)
    masks = np.stack([text_mask(o, im.size) for im, o in zip(images, truth)])
    net = fit_text_detector(pixels, masks, steps=steps, seed=seed)
    save_text_detector(net, out)
    return Path(out)


def main() -> None:
    p = argparse.ArgumentParser(description="fit the tiny text detector on the world's photos with text overlays")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1600)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(train_text_detector(a.out, a.n, a.steps, a.seed))


if __name__ == "__main__":
    main()
