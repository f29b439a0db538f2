"""The frozen encoders every stage shares: the VAE and the T5 text encoder, loaded by HF id or
local directory (pipeline layout with `vae/`, `tokenizer/`, `text_encoder/` subfolders, or a plain
model directory), and T5-encoded exactly as PixArtAlphaPipeline encodes prompts.

An HF id is checked once, in seconds, before loading (shards.hub): an unreachable hub fails in
one line, not after minutes of retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from shards.errors import UserError
from shards.hub import check_model


def _subfolder(spec: str, name: str) -> str | None:
    """Pipeline-layout repos keep each model in a subfolder; plain model repos do not."""
    p = Path(spec)
    if p.is_dir():
        return name if (p / name).is_dir() else None
    return name  # hub id: a pipeline repo is the common case (PixArt-alpha/PixArt-XL-2-1024-MS)


def load_vae(spec: str, device="cpu", dtype=torch.float32):
    """A frozen diffusers AutoencoderKL from a pipeline-layout or plain VAE directory / HF id."""
    from diffusers import AutoencoderKL

    hub = check_model(spec, "the VAE", "--vae")  # an unreachable hub id or an empty folder fails here in seconds
    try:
        sub = _subfolder(spec, "vae")
        try:
            vae = AutoencoderKL.from_pretrained(spec, subfolder=sub, **hub)
        except (OSError, EnvironmentError):
            if sub is None:
                raise
            vae = AutoencoderKL.from_pretrained(spec, **hub)
    except Exception as e:  # noqa: BLE001 - no such model, random weights, a damaged file: one line
        raise UserError(f"cannot load the VAE {spec!r} ({e.__class__.__name__}): pass a local AutoencoderKL directory or a reachable HF id") from None
    return vae.to(device, dtype).eval().requires_grad_(False)


def load_text_encoder(spec: str, device="cpu", dtype=torch.float32, weights: bool = True):
    """(tokenizer, T5 encoder) from a pipeline-layout or plain T5 directory / HF id; `weights`
    False: (tokenizer, None), the encoder not loaded (text_dtype ids: only token ids are stored)."""
    from transformers import AutoTokenizer, T5EncoderModel

    hub = check_model(spec, "the text encoder", "--text-encoder")  # an unreachable hub id or an empty folder fails here in seconds
    try:
        tsub, msub = _subfolder(spec, "tokenizer"), _subfolder(spec, "text_encoder")
        try:
            tok = AutoTokenizer.from_pretrained(spec, subfolder=tsub or "", **hub)
            enc = T5EncoderModel.from_pretrained(spec, subfolder=msub or "", **hub) if weights else None
        except (OSError, EnvironmentError):
            if tsub is None and msub is None:
                raise
            tok = AutoTokenizer.from_pretrained(spec, **hub)
            enc = T5EncoderModel.from_pretrained(spec, **hub) if weights else None
    except Exception as e:  # noqa: BLE001 - no such model, random weights, a damaged file: one line
        raise UserError(f"cannot load the text encoder {spec!r} ({e.__class__.__name__}): pass a local T5 directory or a reachable HF id") from None
    return tok, enc.to(device, dtype).eval().requires_grad_(False) if weights else None


@torch.no_grad()
def encode_text(tokenizer, encoder, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features (B, max_tokens, C) and attention mask (B, max_tokens), tokenised exactly as
    PixArtAlphaPipeline does (padding to max_length, truncation, special tokens)."""
    ids, mask = tokenize(tokenizer, captions, max_tokens)
    dev = next(encoder.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    return encoder(ids, attention_mask=mask)[0], mask


def compile_text_encoder(encoder) -> None:
    """Regional torch.compile of a T5 encoder, in place: each block of its stack compiled (as
    t2i.models.compile_blocks compiles the transformer's). The blocks share one forward, so dynamo
    traces the first (it holds the relative position bias) and one other, and reuses that graph
    for the rest: T5-XXL compiles in the time of two blocks, not 24. The embedding and the final
    norm stay eager. A second batch size recompiles once, with a dynamic batch dimension. Blocks
    compiled already are left as they are (compiling again would recompile them)."""
    for block in encoder.encoder.block:
        if block._compiled_call_impl is None:
            block.compile()


def compile_vae_encoder(vae) -> None:
    """torch.compile of a VAE's encoder in place (its GroupNorm + SiLU chains fuse around the
    convolutions; quant_conv and the posterior stay eager); compiled already: left as it is."""
    if vae.encoder._compiled_call_impl is None:
        vae.encoder.compile()


def tokenize(tokenizer, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 token ids and attention mask (B, max_tokens), as PixArtAlphaPipeline tokenises prompts."""
    t = tokenizer(captions, max_length=max_tokens, padding="max_length", truncation=True, add_special_tokens=True, return_tensors="pt")
    return t.input_ids, t.attention_mask


class VaeFactors(NamedTuple):
    spatial: int  # pixels per latent cell along each side
    scaling: float  # multiplies stored latents into the unit-variance space the model trains in


def vae_factors(vae_spec: str) -> VaeFactors:
    """The VAE's spatial and scaling factors, from its config (read once, no weights loaded)."""
    from diffusers import AutoencoderKL

    hub = check_model(vae_spec, "the VAE", "--vae")  # in seconds, not minutes of hub retries
    try:
        cfg = AutoencoderKL.load_config(vae_spec, subfolder=_subfolder(vae_spec, "vae"), **hub)
    except Exception:
        try:
            cfg = AutoencoderKL.load_config(vae_spec, **hub)
        except Exception:
            raise UserError(f"cannot read the VAE config of {vae_spec!r}: pass a local AutoencoderKL directory or a reachable HF id") from None
    if not isinstance(cfg.get("block_out_channels"), (list, tuple)):
        raise UserError(f"{vae_spec!r} is not an AutoencoderKL (its config has no block_out_channels): pass a VAE")
    return VaeFactors(2 ** (len(cfg["block_out_channels"]) - 1), float(cfg.get("scaling_factor", 0.18215)))
