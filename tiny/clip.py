"""A tiny CLIP the project builds and trains itself in seconds, on the synthetic world (tiny.world).

`build_tiny_clip` makes a small `CLIPModel` with a word-level tokenizer over the world's
vocabulary and a `CLIPImageProcessor`; `fit_on_world` trains it contrastively (CLIP's symmetric
InfoNCE) on rendered world scenes and their dense captions; `save_clip` writes an ordinary HF
directory that `ClipEmbedder` (and `CLIPModel.from_pretrained`) loads. Tests and the demo use it
instead of downloading openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tiny.world import COLORS as W_COLORS
from tiny.world import SHAPES as W_SHAPES
from tiny.world import dense_caption, render, sample_scenes, with_low_quality

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
QUALITY_PHRASE = {"high": "a sharp, clean, high quality photo", "low": "a blurry, grainy, low quality photo"}


def world_caption(scene) -> str:
    """What the tiny CLIP learns to match: the dense caption, plus how the image looks when the
    scene is low quality (web captions carry such words; that is how CLIP learns quality)."""
    suffix = " A blurry, grainy, low quality photo." if getattr(scene, "quality", "high") == "low" else ""
    return dense_caption(scene) + suffix


def build_tiny_clip(corpus: Sequence[str], image_size: int = 32, patch: int = 8, hidden: int = 48, layers: int = 2, seed: int = 0,
                    max_positions: int = 64):
    """(CLIPModel, tokenizer, image processor), randomly initialised; the vocabulary is every
    word of `corpus` (lowercased), so every world caption tokenises without <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4),
        projection_dim=hidden,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def augment(image, rng: np.random.Generator):
    """A copy as the web makes them: cropped a little, resized, re-encoded as JPEG."""
    import io

    from PIL import Image

    w, h = image.size
    c = int(rng.integers(0, w // 10 + 1))  # up to ~10% of the side
    out = image.crop((c, c, w - c, h - c)).resize((int(w * rng.uniform(0.6, 1.0)),) * 2, Image.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
    return Image.open(buf).convert("RGB")


def _info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, b_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows of `a` and `b`; `b_negatives` are extra candidates
    for each `a` (hard negatives: same caption, other quality)."""
    a, b = nn_normalize(a), nn_normalize(b)
    logits = scale * a @ b.T
    target = torch.arange(len(a))
    a_to_b = logits if b_negatives is None else torch.cat([logits, scale * a @ nn_normalize(b_negatives).T], dim=1)
    return (torch.nn.functional.cross_entropy(a_to_b, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def nn_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fit_on_world(model, tokenizer, processor, images: Sequence, texts: Sequence[str], steps: int = 200,
                 batch_size: int = 64, lr: float = 3e-3, seed: int = 0, hard_negatives: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None) -> list[float]:
    """Contrastive training; returns the losses. Two terms: CLIP's symmetric image-text InfoNCE
    (with `hard_negatives[i]`, a caption close to `texts[i]` but wrong, as an extra candidate
    for image i), and an image-image InfoNCE between each image and a copy of it (`augment`), so
    that, like a CLIP trained on web-scale data, the tiny one tells images apart and not only
    captions (what near-duplicate search needs). `labels[i]`, a short phrase from a small set
    ("a sharp photo", "a blurry photo"), adds CLIP's zero-shot classification as a third term:
    image i against every distinct phrase. Inputs are encoded once up front."""
    rng = np.random.default_rng(seed)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    copies = processor(images=[augment(im, rng) for im in images], return_tensors="pt")["pixel_values"]
    tok = tokenizer(list(texts), padding=True, return_tensors="pt")
    neg = tokenizer(list(hard_negatives), padding=True, return_tensors="pt") if hard_negatives else None
    phrases = sorted(set(labels)) if labels else []
    label_ids = torch.tensor([phrases.index(x) for x in labels]) if labels else None
    phrase_tok = tokenizer(phrases, padding=True, return_tensors="pt") if labels else None
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(texts), generator=gen)[:batch_size]
        both = model.get_image_features(pixel_values=torch.cat([pixels[idx], copies[idx]])).pooler_output
        image, copy = both.split(len(idx))
        text = model.get_text_features(input_ids=tok["input_ids"][idx], attention_mask=tok["attention_mask"][idx]).pooler_output
        negatives = None
        if neg is not None:
            negatives = model.get_text_features(input_ids=neg["input_ids"][idx], attention_mask=neg["attention_mask"][idx]).pooler_output
        scale = model.logit_scale.exp()
        loss = _info_nce(image, text, scale, negatives) + _info_nce(image, copy, scale)
        if phrase_tok is not None:
            classes = model.get_text_features(**phrase_tok).pooler_output
            logits = scale * nn_normalize(image) @ nn_normalize(classes).T
            loss = loss + torch.nn.functional.cross_entropy(logits, label_ids[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_clip(model, tokenizer, processor, out_dir: str | Path) -> Path:
    """An ordinary HF CLIP directory."""
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


WATERMARK_PHRASE = " A stock watermark is stamped over the photo."
WATERMARK_LABEL = " with a stock watermark"


def train_world_clip(out_dir: str | Path, n: int = 600, seed: int = 0, low_quality: float = 0.4, steps: int = 450,
                     watermarks: float = 0.0) -> Path:
    """Build and fit a tiny CLIP on `n` rendered world scenes (train split, some low quality)
    and save it to `out_dir`. Deterministic for `seed`; a few seconds to a minute on CPU.
    `watermarks`: the share of scenes drawn with a stock watermark (tiny.overlays), their
    captions saying so, as web captions sometimes do, and the zero-shot phrases telling stamped
    from clean photos: a web CLIP's embedding shows watermarks, which is what the watermark head
    reads; 0 (default) trains the CLIP it always was."""
    import dataclasses

    scenes = with_low_quality(sample_scenes(n, seed), low_quality, seed)
    marked = _watermarked(len(scenes), watermarks, seed)
    mark = [WATERMARK_PHRASE if m else "" for m in marked]
    texts = [world_caption(s) + w for s, w in zip(scenes, mark)]
    other_quality = [world_caption(dataclasses.replace(s, quality="high" if s.quality == "low" else "low")) + w for s, w in zip(scenes, mark)]
    other_mark = [world_caption(s) + ("" if w else WATERMARK_PHRASE) for s, w in zip(scenes, mark)]
    # rendered at twice the model's input: copies resized down to 60% are still down-sampled to
    # the input, never blurred by up-sampling (which would teach the model to ignore blur)
    images = [_marked(render(s, 64), m, seed, i) for i, (s, m) in enumerate(zip(scenes, marked))]
    # the zero-shot term's phrases: the quality, and (with watermarks) whether the photo is stamped
    labels = [QUALITY_PHRASE[s.quality] + (WATERMARK_LABEL if m else "") for s, m in zip(scenes, marked)]
    corpus = texts + other_quality + other_mark + list(QUALITY_PHRASE.values()) + labels
    model, tokenizer, processor = build_tiny_clip(corpus, seed=seed)
    # hard negatives: the caption with the other quality, or (every other scene) the other watermark state
    negatives = [w if watermarks and i % 2 else o for i, (o, w) in enumerate(zip(other_quality, other_mark))]
    fit_on_world(model, tokenizer, processor, images, texts, steps=steps, seed=seed, hard_negatives=negatives, labels=labels)
    return save_clip(model, tokenizer, processor, out_dir)


def _watermarked(n: int, share: float, seed: int) -> list[bool]:
    """Which of `n` scenes carry a watermark (a share of them, by their own rng)."""
    rng = np.random.default_rng([seed, 41])
    return [bool(share) and rng.uniform() < share for _ in range(n)]


def _marked(image, watermarked: bool, seed: int, i: int):
    """`image`, with a stock watermark when `watermarked`."""
    if not watermarked:
        return image
    from tiny.overlays import add_watermark

    return add_watermark(image, np.random.default_rng([seed, i, 43]))[0]


def long_caption(scene, rng: np.random.Generator, tokens: int = 70, last: str | None = None) -> str:
    """A caption of about `tokens` word tokens: the dense caption, then short true sentences about
    the scene in random order (`last`, when given, ends it)."""
    facts = [f"The {scene.color} {scene.shape} is {scene.size}.", f"The {scene.shape} is {scene.color}.",
             f"The background is {scene.background}.", f"The {scene.color} object is a {scene.shape}.",
             "Nothing else is in the picture."]  # fmt: skip
    text = dense_caption(scene)
    while len(re.findall(r"\w+|[^\w\s]", text)) < tokens:
        text += " " + str(rng.choice(facts))
    return text + (" " + last if last else "")


def wrong_colour(text: str, scene, rng: np.random.Generator, after: int = 0) -> str:
    """`text` with one mention of the scene's colour, past character `after`, replaced by another colour."""
    from tiny.world import COLORS

    spots = [m.start() for m in re.finditer(rf"\b{scene.color}\b", text) if m.start() >= after]
    at = int(rng.choice(spots))
    other = str(rng.choice([c for c in COLORS if c != scene.color]))
    return text[:at] + other + text[at + len(scene.color) :]


def train_long_caption_clip(out_dir: str | Path, n: int = 600, seed: int = 0, steps: int = 450) -> Path:
    """A tiny CLIP with OpenAI CLIP's 77-token window, fitted on long world captions (30-75
    tokens) against hard negatives with one colour word wrong anywhere in them: every position
    of its window learns to read colours (for the windowed caption score's test)."""
    rng = np.random.default_rng([seed, 47])
    scenes = sample_scenes(n, seed)
    texts = [long_caption(s, rng, int(rng.integers(30, 70))) for s in scenes]
    negatives = [wrong_colour(t, s, rng) for t, s in zip(texts, scenes)]
    images = [render(s, 64) for s in scenes]
    corpus = texts + negatives + [f"{c} {s}" for c in W_COLORS for s in W_SHAPES]
    model, tokenizer, processor = build_tiny_clip(corpus, seed=seed, max_positions=77)
    fit_on_world(model, tokenizer, processor, images, texts, steps=steps, seed=seed, hard_negatives=negatives)
    return save_clip(model, tokenizer, processor, out_dir)
