"""The class-conditional DiT a class-cond stage trains (t2i.class_cond): diffusers'
`DiTTransformer2DModel` built and initialised as facebookresearch/DiT, `DiTWithNull` (the trained
unit: the null class embeds to zero) and `load_dit` (a DiT from a diffusers directory or from a
class-cond run or checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from t2i.models import LATENT_CHANNELS, get_preset, xavier_linears_and_patch


def build_dit(preset: str, latent_size: int, num_classes: int, learned_sigma: bool = True):
    """A fresh diffusers `DiTTransformer2DModel` of `preset`'s shape (DiT-*/PixArt-* names),
    `num_classes` classes + the null class, initialised as facebookresearch/DiT."""
    from diffusers import DiTTransformer2DModel

    p = get_preset(preset)
    dit = DiTTransformer2DModel(
        num_attention_heads=p.heads, attention_head_dim=p.hidden // p.heads, in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS if learned_sigma else LATENT_CHANNELS, num_layers=p.depth,
        sample_size=latent_size, patch_size=p.patch, num_embeds_ada_norm=num_classes,
        norm_eps=1e-6,  # as the official DiT and PixArt (diffusers' default is 1e-5)
    )  # fmt: skip
    initialize_dit(dit)
    return dit


def initialize_dit(dit) -> None:
    """facebookresearch/DiT's initialisation: xavier linears, N(0, 0.02) label and timestep
    embeddings, zero adaLN modulation (every block starts as the identity), zero final layer."""
    xavier_linears_and_patch(dit)
    nn.init.zeros_(dit.pos_embed.proj.bias)
    for block in dit.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


class DiTWithNull(nn.Module):
    """The trained unit of a class-cond stage: a DiT whose null class embeds to zero.

    Called as the trainer calls PixArtWithNull: (latents, timesteps, class ids, mask, drop);
    `drop` replaces a class by the null class. diffusers' own random label dropout (torch.rand in
    every block, each on its own) is switched off: the trainer drops per sample, seeded."""

    def __init__(self, transformer) -> None:
        super().__init__()
        self.transformer = transformer
        self.null_class = transformer.config.num_embeds_ada_norm
        for block in transformer.transformer_blocks:
            labels = block.norm1.emb.class_embedder
            labels.dropout_prob = 0.0  # the table keeps its null row: its size is fixed at construction
            with torch.no_grad():
                labels.embedding_table.weight[self.null_class].zero_()  # saved as zero: the DiT alone agrees
            labels.embedding_table.register_forward_hook(self._null_is_zero)

    def _null_is_zero(self, module, args, output):
        """The null class's embedding is zero, and so is its gradient: it never moves."""
        return output * (args[0] != self.null_class).unsqueeze(-1).to(output.dtype)

    def forward(self, latents, timesteps, labels, mask=None, drop=None, added_cond_kwargs=None):
        """The DiT's output for class ids `labels` (`drop`: replaced by the null class; `mask` and
        `added_cond_kwargs` are not used by a DiT)."""
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.transformer(latents, timestep=timesteps, class_labels=labels, return_dict=False)[0]


def load_dit(path: str | Path, which: str = "ema"):
    """A `DiTTransformer2DModel` from a diffusers DiT (or pipeline) directory, or from a class-cond
    run or checkpoint directory: its `transformer/` (EMA weights), or with `which="model"` the
    checkpoint's training weights."""
    from diffusers import DiTTransformer2DModel

    from t2i import checkpoint as ckpt
    from t2i.dit_source import dit_directory

    directory, sub = dit_directory(path)
    dit = DiTTransformer2DModel.from_pretrained(directory, subfolder=sub).float()
    if which == "model":
        sd = ckpt.load_weights(directory, "model")
        # the transformer's weights only (a REPA projector, t2i.repa, stays with the checkpoint)
        inner = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
        ckpt.load_matching(dit, inner, f"checkpoint {directory}")
    return dit
