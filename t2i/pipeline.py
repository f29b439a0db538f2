"""A text-to-image checkpoint as diffusers' PixArtAlphaPipeline (PixArtSigmaPipeline for a Sigma
stage, t2i.sigma), with the scheduler of the objective
it was trained with (DPM-Solver++ for DDPM, its flow form for flow), and sampling from it (20 steps, guidance 4.5 by
default); `image_grid` for a grid of samples. t2i.sample is the entry point.

Classifier-free guidance uses the LEARNED null caption as the unconditional branch (passed as
`negative_prompt_embeds`), exactly as in training; the stock pipeline would encode "" with T5.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

import torch

from shards import fs
from shards.errors import UserError
from t2i import checkpoint as ckpt
from t2i.models import null_mask
from t2i.recovery import usable_checkpoint
from t2i.objective import objective_of_state


def pipeline_from_checkpoint(checkpoint: str | Path, vae: str | None = None, text_encoder: str | None = None,
                             which: str = "ema", device: str | None = None, dtype=torch.float32, adapter: str = "merge"):
    """(PixArtAlphaPipeline, or PixArtSigmaPipeline for a Sigma stage; null_caption) assembled from
    a training checkpoint. The VAE and text encoder default to the ones the checkpoint's features were computed with. A LoRA checkpoint's
    adapter is merged into the transformer, or kept as peft layers (`adapter="keep"`)."""
    from t2i.encoders import load_text_encoder, load_vae
    from t2i.sigma import pipeline_class

    ck = usable_checkpoint(checkpoint, which)  # verified: a damaged file is one line (or a warning and an older one)
    state = json.loads((ck / "trainer_state.json").read_text())
    feats = state.get("features", {})
    vae_spec = vae or recorded_model(feats.get("vae"), ck, "--vae")
    te_spec = text_encoder or recorded_model(feats.get("text_encoder"), ck, "--text-encoder")
    if not vae_spec or not te_spec:
        raise UserError(f"checkpoint {ck} does not record its VAE/text encoder: pass --vae and --text-encoder")
    transformer, null = ckpt.load_transformer(ck, which, adapter=adapter)
    tok, enc = load_text_encoder(te_spec)
    pipe = pipeline_class(state.get("config", {}).get("family"))(
        tokenizer=tok, text_encoder=enc, vae=load_vae(vae_spec), transformer=transformer, scheduler=objective_of_state(state).sampler())
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.t2i_null_tokens = int(state.get("null_tokens", 0))  # the null caption's attended tokens (generate)
    return pipe, null.to(device, dtype)


def recorded_model(spec: str | None, ck: Path, flag: str) -> str | None:
    """A model a checkpoint records (its VAE, text encoder), usable from any working directory:
    absolute paths and hub ids as they are; a relative path (checkpoints written before paths
    were recorded absolute) from the current directory, else from the folders above the
    checkpoint (the run's own folder tree); a one-line UserError saying how to fix it otherwise."""
    if not spec or Path(spec).is_absolute() or fs.is_uri(spec) or Path(spec).exists():
        return spec
    for folder in Path(ck).resolve().parents:
        if (folder / spec).exists():
            return str(folder / spec)
    if spec.count("/") <= 1 and not spec.startswith("."):
        return spec  # a hub id (org/name): checked when it loads
    raise UserError(f"checkpoint {ck} records {flag.removeprefix('--').replace('-', ' ')} {spec!r}, a path relative to "
                    f"the folder the run was made in, not found from here: run from that folder, or pass {flag} PATH")


@torch.no_grad()
def generate(pipe, null_caption: torch.Tensor | None, prompts: Sequence[str], steps: int = 20, guidance: float = 4.5,
             seed: int = 0, height: int | None = None, width: int | None = None, max_tokens: int | None = None,
             output_type: str = "pil", null_tokens: int | None = None):
    """Images for `prompts` (PIL, or as diffusers' `output_type` says: "np" for float arrays). With
    `null_caption` the learned null is the unconditional branch (attended on its first `null_tokens`
    tokens, default the pipeline's `t2i_null_tokens`; 0: all); with None the pipeline's own
    T5("") negative is used (the stock behaviour)."""
    prompts = list(prompts)
    cfg = pipe.transformer.config
    size = cfg.sample_size * pipe.vae_scale_factor
    stock_tokens = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default  # alpha 120, Sigma 300
    max_tokens = max_tokens or (null_caption.shape[0] if null_caption is not None else stock_tokens)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=height or size, width=width or size,
              use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
              max_sequence_length=max_tokens, clean_caption=False)
    if null_caption is None or guidance <= 1:
        return pipe(prompt=prompts, **kw).images
    emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_tokens, clean_caption=False)
    neg = null_caption.to(emb.dtype)[None].expand(len(prompts), -1, -1)
    tokens = getattr(pipe, "t2i_null_tokens", 0) if null_tokens is None else null_tokens
    neg_mask = null_mask(torch.ones(neg.shape[:2], dtype=mask.dtype, device=mask.device), tokens)
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask, **kw).images


def image_grid(images, cols: int | None = None):
    """One image of `images` in rows of `cols` (default: up to 8), row-major."""
    from PIL import Image

    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
