"""A class-conditional DiT, read for the import into PixArt-alpha (t2i.import_dit): its weights
renamed to diffusers PixArt keys, and the modulation each block (and the final layer) produces at
a timestep without the class term.

Sources: the facebookresearch/DiT `.pt` layout (a raw state dict, or a training checkpoint with
"ema"/"model") and diffusers' `DiTTransformer2DModel` (a directory or a loaded model), including
a class-cond stage of our trainer (t2i.class_cond: its run directory or a checkpoint of it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from shards.errors import UserError
from shards.hub import load_pretrained, load_weights_file


def official_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """facebookresearch/DiT's sinusoidal timestep features: [cos, sin], frequency shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class DiTSource:
    """A DiT reduced to what the import needs: weights in diffusers PixArt names, and the
    modulation each block (and the final layer) produces at a timestep without the class term."""

    hidden: int
    depth: int
    patch: int
    in_channels: int
    out_channels: int
    latent_size: int
    weights: dict[str, torch.Tensor]  # PixArt key -> tensor
    global_linear: tuple[torch.Tensor, torch.Tensor]  # block 0's adaLN linear, seeds f
    block_modulation: Callable[[int, torch.Tensor], torch.Tensor]  # (i, t) -> (B, 6h)
    final_modulation: Callable[[torch.Tensor], torch.Tensor]  # t -> (B, 2h)
    pos_embed: torch.Tensor | None = None
    dropped: list[str] = field(default_factory=list)
    heads: int | None = None  # known from a diffusers config; guessed for an official state dict


def _mlp(x, w0, b0, w2, b2):
    return F.linear(F.silu(F.linear(x, w0, b0)), w2, b2)


def _block_weights(i: int, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b) -> dict[str, torch.Tensor]:
    q, k, v = qkv_w.chunk(3, dim=0)
    qb, kb, vb = qkv_b.chunk(3, dim=0)
    pre = f"transformer_blocks.{i}."
    return {
        pre + "attn1.to_q.weight": q, pre + "attn1.to_q.bias": qb,
        pre + "attn1.to_k.weight": k, pre + "attn1.to_k.bias": kb,
        pre + "attn1.to_v.weight": v, pre + "attn1.to_v.bias": vb,
        pre + "attn1.to_out.0.weight": proj_w, pre + "attn1.to_out.0.bias": proj_b,
        pre + "ff.net.0.proj.weight": fc1_w, pre + "ff.net.0.proj.bias": fc1_b,
        pre + "ff.net.2.weight": fc2_w, pre + "ff.net.2.bias": fc2_b,
    }


def source_from_official(sd: dict[str, torch.Tensor]) -> DiTSource:
    """Read the facebookresearch/DiT state-dict layout."""
    for wrapper in ("ema", "model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
            break
    sd = {k.removeprefix("module."): v.float() for k, v in sd.items() if torch.is_tensor(v)}
    required = ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise UserError(f"not a facebookresearch/DiT checkpoint (missing {', '.join(missing)}): pass a DiT .pt or a diffusers DiTTransformer2DModel directory")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    xw = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = xw.shape[0], xw.shape[1], xw.shape[2]
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    pos = sd.get("pos_embed")
    latent_size = int(round(math.sqrt(pos.shape[1]))) * patch if pos is not None else 32
    t_w = [sd[f"t_embedder.mlp.{j}.{n}"] for j in (0, 2) for n in ("weight", "bias")]

    def t_emb(t):
        return _mlp(official_timestep_embedding(t), *t_w)

    weights = {
        "pos_embed.proj.weight": xw, "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "adaln_single.emb.timestep_embedder.linear_1.weight": t_w[0],
        "adaln_single.emb.timestep_embedder.linear_1.bias": t_w[1],
        "adaln_single.emb.timestep_embedder.linear_2.weight": t_w[2],
        "adaln_single.emb.timestep_embedder.linear_2.bias": t_w[3],
        "proj_out.weight": sd["final_layer.linear.weight"], "proj_out.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        b = f"blocks.{i}."
        weights.update(_block_weights(i, *(sd[b + n] for n in (
            "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"))))

    def block_mod(i, t):
        return F.linear(F.silu(t_emb(t)), sd[f"blocks.{i}.adaLN_modulation.1.weight"], sd[f"blocks.{i}.adaLN_modulation.1.bias"])

    def final_mod(t):
        return F.linear(F.silu(t_emb(t)), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])

    return DiTSource(
        hidden, depth, patch, in_ch, out_ch, latent_size, weights,
        (sd["blocks.0.adaLN_modulation.1.weight"], sd["blocks.0.adaLN_modulation.1.bias"]),
        block_mod, final_mod, pos_embed=pos,
        dropped=[k for k in sd if k.startswith("y_embedder.")],
    )


def source_from_diffusers(dit) -> DiTSource:
    """Read a diffusers `DiTTransformer2DModel` (each block carries its own timestep embedder)."""
    cfg = dit.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = dit.transformer_blocks
    sd = {k: v.detach().float() for k, v in dit.state_dict().items()}
    emb0 = blocks[0].norm1.emb.timestep_embedder
    weights = {
        "pos_embed.proj.weight": sd["pos_embed.proj.weight"], "pos_embed.proj.bias": sd["pos_embed.proj.bias"],
        "adaln_single.emb.timestep_embedder.linear_1.weight": emb0.linear_1.weight.detach().float(),
        "adaln_single.emb.timestep_embedder.linear_1.bias": emb0.linear_1.bias.detach().float(),
        "adaln_single.emb.timestep_embedder.linear_2.weight": emb0.linear_2.weight.detach().float(),
        "adaln_single.emb.timestep_embedder.linear_2.bias": emb0.linear_2.bias.detach().float(),
        "proj_out.weight": sd["proj_out_2.weight"], "proj_out.bias": sd["proj_out_2.bias"],
    }
    for i in range(len(blocks)):
        b = f"transformer_blocks.{i}."
        qkv_w = torch.cat([sd[b + f"attn1.to_{n}.weight"] for n in "qkv"])
        qkv_b = torch.cat([sd[b + f"attn1.to_{n}.bias"] for n in "qkv"])
        weights.update(_block_weights(i, qkv_w, qkv_b, *(sd[b + n] for n in (
            "attn1.to_out.0.weight", "attn1.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
            "ff.net.2.weight", "ff.net.2.bias"))))

    @torch.no_grad()
    def cond(i, t):
        emb = blocks[i].norm1.emb  # CombinedTimestepLabelEmbeddings; the class term is left out
        return emb.timestep_embedder(emb.time_proj(t).float())

    @torch.no_grad()
    def block_mod(i, t):
        return blocks[i].norm1.linear(F.silu(cond(i, t))).float()

    @torch.no_grad()
    def final_mod(t):
        return dit.proj_out_1(F.silu(cond(0, t))).float()

    lin0 = blocks[0].norm1.linear
    return DiTSource(
        hidden, len(blocks), cfg.patch_size, cfg.in_channels, dit.out_channels, cfg.sample_size, weights,
        (lin0.weight.detach().float(), lin0.bias.detach().float()), block_mod, final_mod,
        dropped=[k for k in sd if "class_embedder" in k], heads=cfg.num_attention_heads,
    )


def dit_directory(path: str | Path) -> tuple[Path, str | None]:
    """(directory, subfolder) of a diffusers DiT: a DiTTransformer2DModel directory, a pipeline
    directory with `transformer/`, or a class-cond training run (t2i.class_cond) or one of its
    checkpoints, whose `transformer/` is a complete DiT."""
    from t2i.checkpoint import latest_checkpoint

    path = Path(path)
    if not path.exists():
        raise UserError(f"DiT checkpoint {path} does not exist: pass a facebookresearch/DiT .pt or a diffusers DiT directory")
    if not (path / "config.json").exists() and not (path / "transformer" / "config.json").exists():
        path = latest_checkpoint(path) or path  # a run directory: its newest checkpoint
    for sub in (None, "transformer"):
        config = path / (sub or "") / "config.json"
        if config.exists():
            kind = json.loads(config.read_text()).get("_class_name")
            if kind != "DiTTransformer2DModel":
                raise UserError(f"{config.parent} holds a {kind}, not a DiT: pass a class-conditional DiT (a class-cond stage, a diffusers DiT or a .pt)")
            return path, sub
    raise UserError(f"{path} has no config.json: pass a diffusers DiTTransformer2DModel directory, a class-cond run directory or a .pt file")


def load_dit_source(src) -> DiTSource:
    """A DiTSource from a `.pt`/`.pth`/`.safetensors` official checkpoint, a diffusers DiT
    directory (or pipeline directory with `transformer/`), or a loaded `DiTTransformer2DModel`."""
    from diffusers import DiTTransformer2DModel

    if isinstance(src, DiTTransformer2DModel):
        return source_from_diffusers(src)
    path = Path(src)
    if not path.exists():
        raise UserError(f"DiT checkpoint {path} does not exist: pass a facebookresearch/DiT .pt or a diffusers DiT directory")
    if path.is_dir():
        directory, sub = dit_directory(path)
        dit = load_pretrained(DiTTransformer2DModel.from_pretrained, str(directory), "DiT", "DiT checkpoint", subfolder=sub)
        return source_from_diffusers(dit.float())
    return source_from_official(load_weights_file(path, "DiT checkpoint", "DiT checkpoint"))
