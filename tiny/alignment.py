"""Does the trained model follow the prompt? Train on tiny/world.py's synthetic scenes (coloured
shapes at known positions, dense captions) and judge generated images automatically
(`tiny.judge.judge_image`): accuracy of colour / position / shape against chance.
(t2i never imports tiny; tiny builds on t2i.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tiny.judge import score
from tiny.world import dense_caption, prompt_text, sample_scenes, write_caption_shards


def write_world_shards(out_dir: str | Path, n: int, size: int = 16, seed: int = 0) -> list[str]:
    """Caption shards of `n` training-split scenes rendered at `size` px with their dense
    captions (embedded PNGs). Returns the captions (a corpus for the tiny tokenizer)."""
    rows = ((f"world-{seed}-{i:07d}", scene, dense_caption(scene)) for i, scene in enumerate(sample_scenes(n, seed, "train")))
    return write_caption_shards(out_dir, rows, size, "truth", rows_per_shard=512, seed=seed)


def corpus(n: int = 2000, seed: int = 12345) -> list[str]:
    """Dense captions and prompts covering every word of the world's templates."""
    scenes = sample_scenes(n, seed, "any")
    return [dense_caption(s) for s in scenes] + [prompt_text(s) for s in scenes]


def evaluate(pipe, null, n: int = 48, seed: int = 1, guidance: float = 4.5, steps: int = 20, split: str = "train",
             prompt_style: str = "dense") -> dict[str, Any]:
    """Generate one image per scene (`n` fresh scenes of `split`) and score them.

    `prompt_style` "dense" prompts with the dense-caption template the model was trained on;
    "short" with the world's one-sentence prompt. The tiny random T5 does not generalise from
    one template to the other (a real T5-XXL does), so "short" measures that gap, not alignment.
    """
    from t2i.sample import generate

    scenes = sample_scenes(n, seed + 1000, split)
    text = dense_caption if prompt_style == "dense" else prompt_text
    images = generate(pipe, null, [text(s) for s in scenes], steps=steps, guidance=guidance, seed=seed)
    return score(list(zip(scenes, images)), attributes=("color", "position", "shape"))
