"""A tiny judge VLM the project trains on the world: a LLaVA of the captioner's build that answers
the yes/no questions of `evals.questions` ("Is the circle red?") with "Yes" or "No", so the
VQAScore judge (evals.vqa, through autolabel's backends) runs on the world offline.

Its answers are taught from the world's exact judge: each training image is read by
`tiny.judge.judge_image`, and a question's answer is `tiny.judge.answer_question` on that
reading (the same rule the agreement is measured with). Images: world renders of every split at
32 px, 30% of them degraded (blur, grain) as generated samples often are; half the questions are
true, half have one named part changed. Saved as a normal HF model directory (both backends load it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from demo.captioner import VISION_HIDDEN, _fit, _sincos_position_init, encode_examples
from evals.questions import Combo, attribute_question, combination_question, object_question, relation_question
from evals.vqa import ASK_SUFFIX
from tiny import judge as J, world as W

IMAGE_SIZE = 32
POSITION_PHRASES = dict(W._POSITION_PHRASE)  # "left" -> "on the left of the image", as the world's captions say it


def _other(rng: np.random.Generator, options, value: str) -> str:
    return str(rng.choice([o for o in options if o != value]))


def _parts(reading: dict, rng: np.random.Generator) -> tuple[str, str, str]:
    """(object, attribute, relation) the image shows: its shape, its colour (or size), its position phrase."""
    attribute = reading["color"] if rng.uniform() < 0.75 else reading["size"]
    return reading["shape"], attribute, POSITION_PHRASES[reading["position"]]


def _changed(part: str, value: str, rng: np.random.Generator) -> str:
    if part == "object":
        return _other(rng, W.SHAPES, value)
    if part == "attribute":
        return _other(rng, W.SIZES if value in W.SIZES else W.COLORS, value)
    return POSITION_PHRASES[_other(rng, W.POSITIONS, next(p for p, t in POSITION_PHRASES.items() if t == value))]


def sample_question(reading: dict, rng: np.random.Generator) -> str:
    """One question about an image read as `reading`: a random category, true or (half the time)
    with one named part changed."""
    obj, attr, rel = _parts(reading, rng)
    kind = str(rng.choice(["object", "attribute", "relation", "combination"]))
    if rng.uniform() < 0.5:  # make it false: change one of the parts this question names
        names = {"object": ["object"], "attribute": ["object", "attribute"], "relation": ["object", "relation"],
                 "combination": ["object", "attribute", "relation"]}[kind]  # fmt: skip
        part = str(rng.choice(names))
        obj, attr, rel = (_changed(part, v, rng) if part == p else v for p, v in (("object", obj), ("attribute", attr), ("relation", rel)))
    if kind == "object":
        return object_question(obj)
    if kind == "attribute":
        return attribute_question(obj, attr)
    if kind == "relation":
        return relation_question(obj, rel)
    return combination_question(Combo(obj, attr, rel))


def training_set(n_images: int, per_image: int, seed: int) -> tuple[list, list[str], list[str]]:
    """(images, questions, "Yes"/"No" answers): world renders read by the exact judge."""
    rng = np.random.default_rng([seed, 29])
    scenes = W.with_low_quality(W.sample_scenes(n_images, seed + 1000, "any"), 0.3, seed)
    images, questions, answers = [], [], []
    for scene in scenes:
        image = W.render(scene, IMAGE_SIZE)
        reading = J.judge_image(image)
        if reading["shape"] is None:
            continue
        for _ in range(per_image):
            q = sample_question(reading, rng)
            images.append(image)
            questions.append(q)
            answers.append("Yes" if J.answer_question(q, reading) else "No")
    return images, questions, answers


def corpus() -> list[str]:
    """Every word the judge reads or writes (its tokenizer's training text)."""
    rng = np.random.default_rng(0)
    reads = [{"color": c, "shape": s, "position": p, "size": z} for c in W.COLORS for s in W.SHAPES for p in W.POSITIONS for z in W.SIZES]
    qs = [sample_question(r, rng) + ASK_SUFFIX for r in reads for _ in range(2)]
    return qs + [" Yes", " No"] * 200 + ["USER: <image>\n", "ASSISTANT:", "ASSISTANT: "] * 100


def train_judge_vlm(out_dir: str | Path, n_images: int = 3000, per_image: int = 3, steps: int = 1500, seed: int = 0,
                    batch_size: int = 32, lr: float = 1e-3, threads: int | None = 2, progress: bool = False) -> dict[str, Any]:
    """Build, train and save the tiny judge at `out_dir`; returns (and writes judge_metrics.json) its metrics."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tiny.llava import build_tiny_llava, save_llava

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = Path(out_dir)
    build_tiny_llava(out, corpus=corpus(), image_size=IMAGE_SIZE, seed=seed, vision_hidden=VISION_HIDDEN)
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    _sincos_position_init(model)
    images, questions, answers = training_set(n_images, per_image, seed)
    data = encode_examples(processor, images, [q + ASK_SUFFIX for q in questions], answers)
    losses, seconds = _fit(model, data, steps, batch_size, lr, np.random.default_rng(seed), progress)
    model.eval()
    save_llava(model, processor, out)
    metrics = {"steps": steps, "examples": len(questions), "yes_share": answers.count("Yes") / len(answers),
               "final_loss": float(np.mean(losses[-20:])), "train_seconds": round(seconds, 1),
               "seconds": round(time.perf_counter() - t0, 1), "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    (out / "judge_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
