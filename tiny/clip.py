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

from tiny.world import dense_caption, render, sample_scenes, with_low_quality

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
QUALITY_PHRASE = {"high": "a sharp, clean, high quality photo", "low": "a blurry, grainy, low quality photo"}


def world_caption(scene) -> str:
    """What the tiny CLIP learns to match: the dense caption, plus how the image looks when the
    scene is low quality (web captions carry such words; that is how CLIP learns quality)."""
    suffix = " A blurry, grainy, low quality photo." if getattr(scene, "quality", "high") == "low" else ""
    return dense_caption(scene) + suffix


def build_tiny_clip(corpus: Sequence[str], image_size: int = 32, patch: int = 8, hidden: int = 48, layers: int = 2, seed: int = 0):
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
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3),
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


def train_world_clip(out_dir: str | Path, n: int = 600, seed: int = 0, low_quality: float = 0.4, steps: int = 450) -> Path:
    """Build and fit a tiny CLIP on `n` rendered world scenes (train split, some low quality)
    and save it to `out_dir`. Deterministic for `seed`; a few seconds to a minute on CPU."""
    import dataclasses

    scenes = with_low_quality(sample_scenes(n, seed), low_quality, seed)
    texts = [world_caption(s) for s in scenes]
    other_quality = [world_caption(dataclasses.replace(s, quality="high" if s.quality == "low" else "low")) for s in scenes]
    # rendered at twice the model's input: copies resized down to 60% are still down-sampled to
    # the input, never blurred by up-sampling (which would teach the model to ignore blur)
    images = [render(s, 64) for s in scenes]
    model, tokenizer, processor = build_tiny_clip(texts + other_quality + list(QUALITY_PHRASE.values()), seed=seed)
    labels = [QUALITY_PHRASE[s.quality] for s in scenes]
    fit_on_world(model, tokenizer, processor, images, texts, steps=steps, seed=seed, hard_negatives=other_quality, labels=labels)
    return save_clip(model, tokenizer, processor, out_dir)
