"""The project's own tiny VLM captioner, trained on the synthetic world.

A LLaVA-class model (CLIP vision tower + MLP projector + Llama language model) with a few
hundred thousand parameters, fine-tuned with plain PyTorch on CPU in a minute or two on world
images and their true dense captions, then saved as a normal Hugging Face model directory (model
+ LlavaProcessor) that both caption backends load (transformers and vLLM).

Training sees exactly what inference sees: every example is built by the saved processor from
the caption job's own prompt (both variants: the paper's plain prompt and the alt-text
conditioned one, with the world's noisy alt-texts), rendered through the processor's chat
template; the loss covers only the caption tokens and the end-of-sequence token. The model is
built by the caption job's `tiny.llava` (vision tower widened to 128); its vision
position embeddings start from 2-D sin-cos values, without which positions were learnt late and
then guessed from colour and shape on held-out scenes.

Held-out scenes (colour, shape, position triples never seen in training, `world.is_heldout`)
measure whether the captioner composes attributes rather than memorising images.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from autolabel import prompts as P
from tiny import judge, world as W
from tiny.llava import save_llava

DEFAULT_IMAGE_SIZE = 32  # the vision tower's input: 4x4 patches of 8 px
VISION_HIDDEN = 128  # at the builder's default 64, shapes were learnt slowly and unreliably


def caption_prompts() -> tuple[str, str]:
    """(plain prompt, alt-text prompt template with {alt}): the caption job's."""
    return P.PAPER_PROMPT, P.ALT_PROMPT


def training_corpus(n: int = 3000, seed: int = 12345) -> list[str]:
    """Every word the captioner must read or write: dense captions, prompts, alt-texts."""
    plain, alt_tpl = caption_prompts()
    rng = np.random.default_rng(seed)
    scenes = W.sample_scenes(n, seed, "any")
    alts = [W.alt_text(s, rng) for s in scenes]
    chat = ["USER: <image>\n", "ASSISTANT:", "ASSISTANT: "]  # LLaVA-1.5's chat words
    return [" " + W.dense_caption(s) for s in scenes] + [plain] + [alt_tpl.format(alt=a) for a in alts] + chat * 100


# --- model construction ----------------------------------------------------------------------


def build_captioner_model(
    out_dir: str | Path, image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0, vision_hidden: int = VISION_HIDDEN
) -> Path:
    """A random tiny LLaVA (+ processor) for the world, saved at `out_dir`, built by the caption
    job's own builder (`tiny.llava`) so it has the layout both backends are tested with.
    The vision tower is wider than the builder's default: shapes need it."""
    from tiny.llava import build_tiny_llava

    return Path(build_tiny_llava(out_dir, corpus=training_corpus(), image_size=image_size, seed=seed, vision_hidden=vision_hidden))


# --- data --------------------------------------------------------------------------------------


def _prompt_for(alt: str | None) -> str:
    """The caption job's question: the alt-text prompt when there is an alt-text, else the paper's."""
    return P.question_for(None, alt, use_alt=alt is not None)


def _chat_text(processor, prompt: str) -> str:
    """The full prompt exactly as the caption job renders it (the processor's chat template)."""
    return P.render_prompt(processor, "llava", prompt)


def encode_examples(processor, images: Sequence[Image.Image], prompts: Sequence[str], captions: Sequence[str]) -> dict:
    """Training tensors built by the saved processor: input ids = prompt (through the chat
    template and the processor's image-token expansion) + caption + EOS; labels -100 except on
    the caption and EOS. Right-padded."""
    import torch

    tok = processor.tokenizer
    texts = [_chat_text(processor, p) for p in prompts]
    enc = processor(images=list(images), text=texts, return_tensors=None, padding=False)
    ids, labels = [], []
    for prompt_ids, cap in zip(enc["input_ids"], captions):
        cap_ids = tok(" " + cap, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(list(prompt_ids) + cap_ids)
        labels.append([-100] * len(prompt_ids) + cap_ids)
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    return {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(width)[None, :] < torch.tensor([len(x) for x in ids])[:, None]).long(),
        "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        "pixel_values": torch.as_tensor(np.stack(enc["pixel_values"])),
    }


def _load_world(world_dir: str | Path, limit: int | None = None) -> tuple[list[W.Scene], list[Image.Image], list[str]]:
    rows = W.read_scenes(world_dir)[:limit]
    images = [Image.open(Path(world_dir) / r.get("image", r["file_name"])).convert("RGB") for r, _ in rows]
    return [s for _, s in rows], images, [r["alt_text"] for r, _ in rows]


# --- training and evaluation --------------------------------------------------------------------


def train_captioner(
    world_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1500,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    image_size: int = DEFAULT_IMAGE_SIZE,
    alt_prompt_share: float = 0.5,
    eval_dir: str | Path | None = None,
    eval_n: int = 200,
    threads: int | None = 2,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build a tiny LLaVA and fine-tune it to caption the world; save it to `out_dir`.

    `world_dir`: a folder from `world.write_sam_folder` (train split). Each step draws a batch;
    `alt_prompt_share` of the examples use the alt-text conditioned prompt with the image's
    noisy alt-text, the rest the paper's plain prompt. AdamW, linear warm-up then cosine decay.
    With `eval_dir` (a held-out world folder) the saved model is evaluated on `eval_n` images.
    Returns metrics: steps, seconds, final loss, parameters, and the evaluation when asked.
    Writes `out_dir/captioner_metrics.json` too.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = Path(out_dir)
    build_captioner_model(out, image_size=image_size, seed=seed)
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    _sincos_position_init(model)
    scenes, images, alts = _load_world(world_dir)
    rng = np.random.default_rng(seed)
    use_alt = rng.uniform(size=len(scenes)) < alt_prompt_share
    prompts = [_prompt_for(a if u else None) for a, u in zip(alts, use_alt)]
    data = encode_examples(processor, images, prompts, [W.dense_caption(s) for s in scenes])
    t_build = time.perf_counter() - t0

    losses, train_s = _fit(model, data, steps, batch_size, lr, rng, progress)
    model.eval()
    save_llava(model, processor, out)  # the layout both caption backends load
    metrics: dict[str, Any] = {
        "steps": steps, "batch_size": batch_size, "train_images": len(scenes), "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(t_build, 2), "train_seconds": round(train_s, 2),
        "final_loss": float(np.mean(losses[-20:])), "first_loss": losses[0] if losses else None,
    }  # fmt: skip
    if eval_dir is not None:
        metrics["heldout"] = evaluate_captioner(out, eval_dir, n=eval_n)
    (out / "captioner_metrics.json").write_text(json.dumps(metrics, indent=2))
    if log:
        log(json.dumps(metrics))
    return metrics


def _fit(model, data: dict, steps: int, batch_size: int, lr: float, rng: np.random.Generator,
         progress: bool) -> tuple[list[float], float]:
    """AdamW, linear warm-up then cosine decay, on batches of `data` drawn by `rng`; returns the
    per-step losses and the seconds it took."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    losses: list[float] = []
    t_train = time.perf_counter()
    bar = _progress(progress, steps, "training captioner")
    n = len(data["input_ids"])
    for step in range(steps):
        idx = torch.as_tensor(rng.choice(n, size=min(batch_size, n), replace=False))
        batch = {k: v[idx] for k, v in data.items()}
        width = int(batch["attention_mask"].sum(1).max())  # drop columns that are all padding
        batch = {k: (v[:, :width] if k != "pixel_values" else v) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1, description=f"training captioner  loss {np.mean(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    return losses, time.perf_counter() - t_train


def _sincos_position_init(model) -> None:
    """Start the vision tower's position embeddings from 2-D sin-cos values (as MAE does) instead
    of CLIP's N(0, 0.02): a random tower otherwise barely knows where a patch is, and the
    captioner then guesses positions from colour and shape."""
    import torch

    tower = model.model.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings
    table = emb.position_embedding.weight  # (1 + side*side, dim): the class token first
    side, dim = int(round((table.shape[0] - 1) ** 0.5)), table.shape[1]
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)
    with torch.no_grad():
        table.zero_()
        table[1:, : grid.shape[1]] = grid


class _Bar:
    def __init__(self, total: int, description: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
        self._p.start()
        self._task = self._p.add_task(description, total=total)

    def update(self, n: int, description: str) -> None:
        self._p.update(self._task, advance=n, description=description)

    def close(self) -> None:
        self._p.stop()


def _progress(enabled: bool, total: int, description: str) -> _Bar | None:
    return _Bar(total, description) if enabled else None


def caption_images(
    model_dir: str | Path,
    images: Sequence[Image.Image],
    alt_texts: Sequence[str | None] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Greedy captions with transformers, built through the saved processor and chat template
    (the plain prompt, or the alt-text prompt where an alt-text is given)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    alts = list(alt_texts) if alt_texts is not None else [None] * len(images)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        texts = [_chat_text(processor, _prompt_for(a)) for a in alts[i : i + batch_size]]
        enc = processor(images=list(images[i : i + batch_size]), text=texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in out]


def evaluate_captioner(
    model_dir: str | Path,
    world_dir: str | Path | None = None,
    n: int | None = 200,
    scenes: Sequence[W.Scene] | None = None,
    images: Sequence[Image.Image] | None = None,
    with_alt_text: bool = False,
) -> dict[str, Any]:
    """Caption `n` images of a world folder (or the given `scenes` + `images`) and score the
    captions against the truth (`tiny.judge.score_captions`): per-attribute accuracy and chance.
    `with_alt_text` uses the folder's alt-texts in the alt-text prompt."""
    alts = None
    if world_dir is not None:
        scenes, images, alt_list = _load_world(world_dir, n)
        alts = alt_list if with_alt_text else None
    if scenes is None or images is None:
        raise ValueError("give world_dir, or scenes and images")
    t0 = time.perf_counter()
    captions = caption_images(model_dir, images, alts)
    result = judge.score_captions(list(zip(scenes, captions)))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["examples"] = [{"truth": W.dense_caption(s), "caption": c} for s, c in list(zip(scenes, captions))[:3]]
    return result
