"""Tiny local models for CPU and CI: a T5 encoder with a locally trained tokenizer, and a small VAE.

Nothing here downloads anything. The T5 encoder is random (its word embeddings are distinct,
which is all a tiny text-to-image model needs to tell "red" from "blue"); the VAE is briefly
fitted to random coloured shapes so that decode(encode(x)) ~ x and generated latents decode to
images whose colours an automatic checker can read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def build_tiny_text_encoder(out_dir: str | Path, corpus: Iterable[str], seed: int = 0) -> Path:
    """Learn a word-level Unigram vocabulary from `corpus` (log-frequency scores, single
    characters as fallback pieces) and save it as a T5 tokenizer with a random tiny T5 encoder.

    Layout (the diffusers pipeline layout): `out_dir/tokenizer/` and `out_dir/text_encoder/`.
    Returns `out_dir`.
    """
    from collections import Counter

    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    out_dir = Path(out_dir)
    words = Counter(w for line in corpus for w in line.split())
    chars = Counter(c for w in words for c in w)
    total = sum(words.values()) + sum(chars.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, math.log(n / total)) for w, n in words.most_common()]
    # characters score far below words, so known words stay one piece and unseen words still split
    vocab += [(c, math.log(n / total) - 10.0) for c, n in chars.most_common()]
    vocab += [("▁" + c, math.log(n / total) - 10.0) for c, n in chars.most_common() if "▁" + c not in dict(vocab)]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = 512
    tok.save_pretrained(out_dir / "tokenizer")

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **TINY_T5)
    T5EncoderModel(cfg).eval().save_pretrained(out_dir / "text_encoder")
    return out_dir


def random_shape_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """`n` images in [-1, 1]: a random background with one or two random coloured boxes/discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = np.broadcast_to(rng.uniform(0, 1, (3, 1, 1)), (3, size, size)).copy()
        for _ in range(rng.integers(1, 3)):
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(size / 8, size / 3)
            if rng.random() < 0.5:
                m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            else:
                m = (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
            img[:, m] = rng.uniform(0, 1, (3, 1))
        out[i] = img * 2 - 1
    return torch.from_numpy(out)


def shape_images(n: int, size: int = 32, seed: int = 0, degraded: float = 0.25) -> torch.Tensor:
    """`n` images in [-1, 1] of generic flat graphics: a plain, tilted or grainy background with
    one or two anti-aliased shapes of the world's kinds (tiny.world.shape_mask) of random colour,
    size and place; a share `degraded` blurred and grainy. What a VAE for illustration-like
    images should keep: sharp edges and corners, flat colours, and blur and grain where the photo
    has them."""
    return labelled_shape_images(n, size, seed, degraded)[0]


def labelled_shape_images(n: int, size: int = 32, seed: int = 0, degraded: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """`shape_images` (the same images for the same arguments) and (n, size, size) int64 labels:
    per pixel, 0 for background or 1 + the index in tiny.world.SHAPES of the topmost shape
    covering more than half of it (the dense targets the demo's teacher is fitted on)."""
    from PIL import Image, ImageFilter

    from tiny.world import SHAPES, shape_mask

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.empty((n, 3, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        img = np.broadcast_to(rng.uniform(0, 1, 3), (size, size, 3)).copy()
        style = rng.integers(0, 3)
        if style == 1:
            angle = rng.uniform(0, 2 * np.pi)
            img += (0.15 * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
        elif style == 2:
            img += rng.normal(0, 0.02, (size, size, 1))
        for _ in range(rng.integers(1, 3)):
            shape = str(rng.choice(SHAPES))
            cx, cy = rng.uniform(0, size, 2)
            half = rng.uniform(size / 12, size / 3.5)
            alpha = shape_mask(shape, cx, cy, 2 * half, size)[..., None]
            img = img * (1 - alpha) + rng.uniform(0, 1, 3) * alpha
            labels[i][alpha[..., 0] > 0.5] = 1 + SHAPES.index(shape)
        img = np.clip(img, 0, 1)
        if rng.uniform() < degraded:
            pil = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 28))
            img = np.clip(np.asarray(pil, np.float32) / 255 + rng.normal(0, 0.08, (size, size, 3)), 0, 1)
        out[i] = img.transpose(2, 0, 1) * 2 - 1
    return torch.from_numpy(out), torch.from_numpy(labels)


def build_tiny_vae(out_dir: str | Path, fit_steps: int = 300, size: int = 16, seed: int = 0, data: str = "boxes",
                   progress: bool = False) -> Path:
    """A 2-level AutoencoderKL (4 latent channels, downsample x2), fitted `fit_steps` Adam steps
    (reconstruction + a small KL term), saved to `out_dir`.

    `data` "boxes": random boxes and discs, constant lr 2e-3 (seconds; for tests). "shapes":
    `shape_images` (polygons, textures, degradations), a one-cycle lr up to 2e-3 and an L1 term
    that keeps edges sharp: a VAE whose reconstructions keep shapes legible (the demo ships one,
    fitted offline by `python -m demo.vae`)."""
    from diffusers import AutoencoderKL

    if data not in ("boxes", "shapes"):
        raise ValueError(f"data must be boxes or shapes, not {data!r}")
    images = random_shape_images if data == "boxes" else shape_images
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=size,
    )
    if fit_steps:
        _fit_vae(vae, images, fit_steps, size, seed, shapes=data == "shapes", progress=progress)
    with torch.no_grad():  # unit-variance latents, as SD's 0.18215 does for the SD VAE
        std = vae.encode(images(256, size, seed=seed + 7)).latent_dist.mean.std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    vae.save_pretrained(out_dir)
    (Path(out_dir) / "t2i_tiny.json").write_text(json.dumps({"fit_steps": fit_steps, "size": size, "data": data, "seed": seed}))
    return Path(out_dir)


def _fit_vae(vae, images, steps: int, size: int, seed: int, shapes: bool, progress: bool) -> None:
    """Adam on fresh batches of 32 `images` per step; MSE (+ L1 for shapes) + 1e-6 KL."""
    from rich.progress import track

    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05) if shapes else None
    for step in track(range(steps), description="fitting the tiny VAE", disable=not progress):
        x = images(32, size, seed=seed * 100003 + step)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        if shapes:
            loss = loss + 0.5 * (rec - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    vae.eval()


def build_tiny_models(out_dir: str | Path, corpus: Iterable[str], vae_fit_steps: int = 300) -> dict[str, str]:
    """Build both tiny models under `out_dir`; returns {"vae": dir, "text_encoder": dir}."""
    out_dir = Path(out_dir)
    build_tiny_text_encoder(out_dir / "t5", corpus)
    build_tiny_vae(out_dir / "vae", fit_steps=vae_fit_steps)
    return {"vae": str(out_dir / "vae"), "text_encoder": str(out_dir / "t5")}
