"""Re-parameterise a class-conditional DiT into PixArt-alpha (the paper's initialisation).

Sources (read by t2i.dit_source): the facebookresearch/DiT `.pt` layout (a raw state dict, or a training checkpoint with
"ema"/"model") and diffusers' `DiTTransformer2DModel` (a directory or a loaded model), including
a class-cond stage of our trainer (t2i.class_cond: its run directory or a checkpoint of it).

What happens:
- shared weights are copied: patch embedding, self-attention (qkv split into q/k/v), MLP,
  timestep embedder, final projection;
- the class embedder is dropped; cross-attention output projections are zero, so the new
  cross-attention adds nothing at first;
- adaLN-single: the global MLP f is initialised from block 0's adaLN MLP, and every block's
  table is E(i) = adaLN_i(t_emb(500)) - f(t_emb_pixart(500)), the final layer's table likewise;
  so at t = 500 (and only there) the PixArt model computes the DiT's function without a class
  term. The table absorbs differences in timestep features (diffusers' DiT uses
  downscale_freq_shift=1, PixArt 0) and per-block timestep embedders (diffusers' DiT has one
  per block; the official DiT shares one).
The official PixArt code for this was never released; this is our implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shards.checks import Range, check_output_dir, check_ranges
from shards.errors import UserError

# The model code (torch, t2i.models, t2i.dit_source) is imported when a DiT is imported, so that
# ImportDitConfig and its defaults read without it (the CLI's --help).

REPARAM_T = 500


@dataclass
class ImportDitConfig:
    """Every setting of the import-dit command (its flags map 1:1)."""

    ckpt: Path  # a facebookresearch/DiT .pt, or a diffusers DiTTransformer2DModel directory
    out: Path  # the directory for the PixArtTransformer2DModel
    caption_channels: int = 4096  # the text encoder's width (T5-XXL: 4096)
    heads: int | None = None  # attention heads (default: the DiT preset's)

    def validate(self) -> None:
        """A one-line UserError for a number out of range or an --out that cannot be written."""
        check_ranges(self, {"caption_channels": Range(1, 65536), "heads": Range(1, 1024)})
        check_output_dir(self.out)


def import_dit_command(cfg: ImportDitConfig) -> str:
    """`t2i-data import-dit`: the PixArt model saved to `cfg.out`, then what the command prints."""
    cfg.validate()
    model, info = import_dit(cfg.ckpt, caption_channels=cfg.caption_channels, num_heads=cfg.heads)
    model.save_pretrained(cfg.out)
    return (f"wrote {cfg.out}: depth {info['depth']}, hidden {info['hidden']}, {info['heads']} heads, "
            f"{len(info['copied'])} tensors copied, dropped {', '.join(info['dropped']) or 'nothing'}")


def guess_heads(hidden: int, depth: int) -> int:
    """DiT's preset head count for this shape (XL: 16, L: 16, B: 12, S: 6), else 64-d heads."""
    from t2i.models import PRESETS

    for p in PRESETS.values():
        if p.hidden == hidden and p.depth == depth:
            return p.heads
    return max(1, hidden // 64)


def import_dit(
    src,
    caption_channels: int = ImportDitConfig.caption_channels,
    num_heads: int | None = None,
    latent_size: int | None = None,
    seed: int = 0,
):
    """Build a `PixArtTransformer2DModel` from a class-conditional DiT (see module docstring);
    `src` as t2i.dit_source.load_dit_source takes it.

    Returns (model, info); info lists copied/dropped keys and the positional-embedding check.
    """
    import torch

    with torch.no_grad():
        return _import_dit(src, caption_channels, num_heads, latent_size, seed)


def _import_dit(src, caption_channels: int, num_heads: int | None, latent_size: int | None, seed: int):
    import torch

    from t2i.dit_source import load_dit_source
    from t2i.models import LATENT_CHANNELS, Preset, build_transformer

    s = load_dit_source(src)
    heads = num_heads or s.heads or guess_heads(s.hidden, s.depth)
    if s.hidden % heads:
        raise UserError(f"DiT hidden size {s.hidden} is not divisible by {heads} heads: pass --heads")
    if s.in_channels != LATENT_CHANNELS:
        raise UserError(f"DiT has {s.in_channels} input channels, PixArt expects {LATENT_CHANNELS}: use a latent-space DiT")
    torch.manual_seed(seed)
    size = latent_size or s.latent_size
    if s.out_channels not in (s.in_channels, 2 * s.in_channels):
        raise UserError(f"DiT has {s.out_channels} output channels: expected {s.in_channels} or {2 * s.in_channels} (learned sigma)")
    # build_transformer initialises the new parts: cross-attention (zero out-proj), caption projection
    model = build_transformer(Preset(depth=s.depth, hidden=s.hidden, heads=heads, patch=s.patch), size, caption_channels,
                              in_channels=s.in_channels, learned_sigma=s.out_channels == 2 * s.in_channels,
                              use_additional_conditions=False)  # size embeddings would break exactness at t=500
    state = model.state_dict()
    for k, v in s.weights.items():
        if state[k].shape != v.shape:
            raise UserError(f"DiT weight {k} has shape {tuple(v.shape)}, PixArt expects {tuple(state[k].shape)}")
        state[k].copy_(v)
    state["adaln_single.linear.weight"].copy_(s.global_linear[0])
    state["adaln_single.linear.bias"].copy_(s.global_linear[1])
    model.load_state_dict(state)

    t = torch.tensor([REPARAM_T])
    shared, t_emb = model.adaln_single(t, None, batch_size=1, hidden_dtype=torch.float32)
    for i, block in enumerate(model.transformer_blocks):
        block.scale_shift_table.copy_((s.block_modulation(i, t) - shared).view(6, s.hidden))
    model.scale_shift_table.copy_(s.final_modulation(t).view(2, s.hidden) - t_emb)

    info = {"copied": sorted(s.weights), "dropped": s.dropped, "heads": heads, "hidden": s.hidden, "depth": s.depth, "patch": s.patch}
    if s.pos_embed is not None and s.pos_embed.shape == model.pos_embed.pos_embed.shape:
        info["pos_embed_max_abs_diff"] = float((s.pos_embed - model.pos_embed.pos_embed).abs().max())
    return model, info
