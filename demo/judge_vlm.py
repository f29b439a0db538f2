"""A tiny judge VLM the project trains on the world: a LLaVA of the captioner's build that answers
the yes/no questions of `evals.questions` ("Is the circle red?") with "Yes" or "No", so the
VQAScore judge (evals.vqa, through autolabel's backends) runs on the world offline.

Its answers are taught from the world's exact judge: each training image is read by
`tiny.judge.judge_image`, and a question's answer is `tiny.judge.answer_question` on that
reading (the same rule the agreement is measured with). Images: world renders of every split at
32 px, 30% of them degraded (blur, grain) as generated samples often are; half the questions are
true, half have one named part changed. Saved as a normal HF model directory (both backends load it).

Taught on the answer token alone it stayed at chance (54-63% agreement) for thousands of steps: a
yes/no answer is an interaction of a question word with the image, which gives a small model no
first-order gradient. Three changes, none of them to the architecture or the prompt, made it learn:
- deep supervision inside the prompt (training targets only; the scorer still reads the first
  answer token): the last image token, the newline and the next two tokens are taught the image's
  shape, colour, position and size words (a summary every later token can read), and every question
  token from the first attribute word on is taught " Yes"/" No": whether all attribute words so far
  match the reading (a running AND whose last step is the answer);
- 30% of the examples are short captions of the reading ("A large red circle on the left of the image.");
- an init for a model this small: the language model's and projector's linear layers N(0, 1/fan_in)
  (the builder's 0.02 suits 768 wide, not 64), and the projector centred and scaled on training images
  (its input is dominated by a constant the sin-cos positions add, leaving the image content ~3%).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from demo.captioner import VISION_HIDDEN, _fit, _sincos_position_init, encode_examples
from evals.questions import Combo, attribute_question, combination_question, object_question, relation_question
from evals.vqa import ASK_SUFFIX
from tiny import judge as J, world as W

SHIPPED_JUDGE = Path(__file__).resolve().parent / "assets" / "tiny_judge"  # the demo's eval stage judges with it
IMAGE_SIZE = 32
SUMMARY = ("shape", "color", "position", "size")  # taught at the last image token and the three after it
CAPTION_SHARE = 0.3
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


def read_images(n_images: int, seed: int) -> tuple[list, list[dict]]:
    """(images, readings): world renders of every split, 30% degraded, read by the exact judge
    (images where it finds no object are left out)."""
    scenes = W.with_low_quality(W.sample_scenes(n_images, seed + 1000, "any"), 0.3, seed)
    images, readings = [], []
    for scene in scenes:
        image = W.render(scene, IMAGE_SIZE)
        reading = J.judge_image(image)
        if reading["shape"] is not None:
            images.append(image)
            readings.append(reading)
    return images, readings


def training_set(n_images: int, per_image: int, seed: int) -> tuple[list, list[str], list[str]]:
    """(images, questions, "Yes"/"No" answers): world renders read by the exact judge."""
    images, questions, answers, _ = _questions(*read_images(n_images, seed), per_image, seed)
    return images, questions, answers


def _questions(images: list, readings: list[dict], per_image: int, seed: int) -> tuple[list, list, list, list]:
    """(images, questions, answers, readings): `per_image` questions about each read image."""
    rng = np.random.default_rng([seed, 29])
    out: tuple[list, list, list, list] = ([], [], [], [])
    for image, reading in zip(images, readings):
        for _ in range(per_image):
            q = sample_question(reading, rng)
            for column, value in zip(out, (image, q, "Yes" if J.answer_question(q, reading) else "No", reading)):
                column.append(value)
    return out


def caption_of(reading: dict) -> str:
    """A short true caption of a reading: "A large red circle on the left of the image."."""
    return f"A {reading['size']} {reading['color']} {reading['shape']} {POSITION_PHRASES[reading['position']]}."


def _attribute_tokens(tokenizer) -> dict[int, tuple[str, str]]:
    """token id -> (attribute, word) for every colour, shape, position and size word (one token each)."""
    words = {**{w: "color" for w in W.COLORS}, **{w: "shape" for w in W.SHAPES}, **{w: "position" for w in W.POSITIONS},
             **{w: "size" for w in W.SIZES}}  # fmt: skip
    out = {}
    for word, attribute in words.items():
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the judge's tokenizer splits {word!r}: its corpus must hold the world's words")
        out[ids[0]] = (attribute, word)
    return out


def deep_labels(data: dict, readings: Sequence[dict], tokenizer, image_token_id: int) -> None:
    """Add the in-prompt targets (the module docstring) to `data["labels"]` (encode_examples'), in place.
    labels[j + 1] is the target of the logits at j."""
    words = _attribute_tokens(tokenizer)
    word_ids = {word: i for i, (_, word) in words.items()}
    yes, no = (tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in ("Yes", "No"))
    for ids, labels, reading in zip(data["input_ids"].tolist(), data["labels"], readings):
        prompt_end = int((labels != -100).nonzero()[0])  # the first answer token
        last_image = max(j for j in range(prompt_end) if ids[j] == image_token_id)
        for offset, attribute in enumerate(SUMMARY):
            labels[last_image + offset + 1] = word_ids[reading[attribute]]
        ok = None
        for j in range(last_image + 1, prompt_end - 1):
            if ids[j] in words:
                attribute, word = words[ids[j]]
                ok = ok is not False and reading[attribute] == word
            if ok is not None:
                labels[j + 1] = yes if ok else no


def corpus() -> list[str]:
    """Every word the judge reads or writes (its tokenizer's training text)."""
    rng = np.random.default_rng(0)
    reads = [{"color": c, "shape": s, "position": p, "size": z} for c in W.COLORS for s in W.SHAPES for p in W.POSITIONS for z in W.SIZES]
    qs = [sample_question(r, rng) + ASK_SUFFIX for r in reads for _ in range(2)]
    return qs + [" Yes", " No"] * 200 + ["USER: <image>\n", "ASSISTANT:", "ASSISTANT: "] * 100


def _small_init(model) -> None:
    """N(0, 1/fan_in) for the language model's, projector's and head's linear layers."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.startswith("model.vision_tower"):
                module.weight.normal_(0.0, module.weight.shape[1] ** -0.5)


def _centre_projector(model, pixel_values, out_rms: float = 0.3) -> None:
    """Centre and scale the projector on these images: its input standardised per feature, its
    hidden layer's pre-activations of unit spread, its output centred with `out_rms` spread."""
    import torch

    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        x = hidden[model.config.vision_feature_layer][:, 1:].reshape(-1, hidden[-1].shape[-1])  # "default": no class token
        mean, std = x.mean(0), x.std(0) + 1e-6
        proj = model.model.multi_modal_projector
        w1 = proj.linear_1.weight / std
        w1 /= ((x - mean) @ w1.T).std()
        proj.linear_1.weight.copy_(w1)
        proj.linear_1.bias.copy_(-(w1 @ mean))
        z = proj.act(proj.linear_1(x))
        out = z @ proj.linear_2.weight.T
        proj.linear_2.weight.mul_(out_rms / (out - out.mean(0)).pow(2).mean().sqrt())
        proj.linear_2.bias.copy_(-(z.mean(0) @ proj.linear_2.weight.T))


def _examples(processor, image_token_id: int, n_images: int, per_image: int, seed: int) -> tuple[dict, int]:
    """Training tensors: questions (+ ASK_SUFFIX) with their answers and CAPTION_SHARE short captions
    (the paper's prompt) of the same readings, all with deep_labels; and the number of questions."""
    from autolabel.prompts import PAPER_PROMPT

    read = read_images(n_images, seed)
    images, questions, answers, readings = _questions(*read, per_image, seed)
    n_cap = int(CAPTION_SHARE * len(questions) / (1 - CAPTION_SHARE))
    cap_images = [read[0][i % len(read[0])] for i in range(n_cap)]
    cap_readings = [read[1][i % len(read[1])] for i in range(n_cap)]
    prompts = [q + ASK_SUFFIX for q in questions] + [PAPER_PROMPT] * n_cap
    data = encode_examples(processor, images + cap_images, prompts, answers + [caption_of(r) for r in cap_readings])
    deep_labels(data, readings + cap_readings, processor.tokenizer, image_token_id)
    return data, len(questions)


def train_judge_vlm(out_dir: str | Path, n_images: int = 4000, per_image: int = 4, steps: int = 3500, seed: int = 0,
                    batch_size: int = 32, lr: float = 2e-3, threads: int | None = 2, progress: bool = False) -> dict[str, Any]:
    """Build, train and save the tiny judge at `out_dir`; returns (and writes judge_metrics.json) its metrics.

    The defaults measured 91.9% agreement with the exact judge on suite_images(120, seed=99) (97.4% on
    its own training questions), training 300 s of 377 s in all at 1 thread on a loaded 2-core CPU."""
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
    data, n_questions = _examples(processor, model.config.image_token_id, n_images, per_image, seed)
    _small_init(model)
    _centre_projector(model, data["pixel_values"][:512])
    losses, seconds = _fit(model, data, steps, batch_size, lr, np.random.default_rng(seed), progress)
    model.eval()
    save_llava(model, processor, out)
    metrics = {"steps": steps, "examples": len(data["input_ids"]), "questions": n_questions,
               "final_loss": float(np.mean(losses[-20:])), "train_seconds": round(seconds, 1),
               "seconds": round(time.perf_counter() - t0, 1), "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    (out / "judge_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main() -> None:
    """`python -m demo.judge_vlm`: fit the judge the demo ships (demo/assets/tiny_judge), once, offline."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default=str(SHIPPED_JUDGE))
    ap.add_argument("--steps", type=int, default=3500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    metrics = train_judge_vlm(args.out, steps=args.steps, seed=args.seed, threads=args.threads, progress=True)
    record = {"made_by": "python -m demo.judge_vlm", "data": "world renders of every split at 32 px, 30% degraded, read by tiny.judge",
              "threads": args.threads, "seed": args.seed, **metrics}  # fmt: skip
    (Path(args.out) / "judge_metrics.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
