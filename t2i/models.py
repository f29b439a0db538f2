"""PixArt-alpha models on diffusers' `PixArtTransformer2DModel`: named size presets (DiT style), the
trainable null caption for classifier-free guidance, and a FLOPs estimate for MFU (nanoGPT style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shards.errors import UserError


@dataclass(frozen=True)
class Preset:
    depth: int
    hidden: int
    heads: int
    patch: int


PRESETS: dict[str, Preset] = {
    # the paper's model (DiT-XL/2 backbone + cross-attention), ~611M parameters
    "PixArt-XL/2": Preset(depth=28, hidden=1152, heads=16, patch=2),
    "PixArt-L/2": Preset(depth=24, hidden=1024, heads=16, patch=2),
    "PixArt-B/2": Preset(depth=12, hidden=768, heads=12, patch=2),
    "PixArt-S/2": Preset(depth=12, hidden=384, heads=6, patch=2),
    # CPU/CI presets: 0.2M (tiny) to 1.2M (mini) parameters
    "PixArt-tiny/2": Preset(depth=2, hidden=64, heads=4, patch=2),
    "PixArt-tiny/4": Preset(depth=2, hidden=128, heads=4, patch=4),  # hidden > patch^2 x channels
    "PixArt-mini/2": Preset(depth=4, hidden=128, heads=4, patch=2),  # ~1.2M: enough to draw 32 px shapes
}

LATENT_CHANNELS = 4


def get_preset(name: str) -> Preset:
    """A preset by name; `DiT-<size>` names (a class-conditional stage's, t2i.class_cond) are the
    backbone of `PixArt-<size>`: same depth, width, heads and patch, so one imports into the other."""
    if name.startswith("DiT-") and name.replace("DiT-", "PixArt-", 1) in PRESETS:
        return PRESETS[name.replace("DiT-", "PixArt-", 1)]
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}: use one of {', '.join(PRESETS)} (or DiT-* for the same backbones)")
    return PRESETS[name]


def build_transformer(
    preset: str | Preset,
    latent_size: int,
    caption_channels: int,
    in_channels: int = LATENT_CHANNELS,
    learned_sigma: bool = True,
    use_additional_conditions: bool | None = None,
    norm_eps: float = 1e-6,
    interpolation_scale: float | None = None,
):
    """A fresh `PixArtTransformer2DModel` for `preset` on `latent_size`^2 latents.

    out_channels is always explicit (4, or 8 for learned sigma): `None` breaks the pipeline.
    The cross-attention output projections start at zero, as in the paper. `interpolation_scale`:
    the positions' (None: diffusers' default for the side; PixArt-Sigma's, t2i.sigma).
    """
    from diffusers import PixArtTransformer2DModel

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.hidden % p.heads:
        raise UserError(f"preset {preset}: hidden {p.hidden} not divisible by heads {p.heads}")
    model = PixArtTransformer2DModel(
        num_attention_heads=p.heads,
        attention_head_dim=p.hidden // p.heads,
        in_channels=in_channels,
        out_channels=in_channels * 2 if learned_sigma else in_channels,
        num_layers=p.depth,
        cross_attention_dim=p.hidden,
        sample_size=latent_size,
        patch_size=p.patch,
        caption_channels=caption_channels,
        use_additional_conditions=use_additional_conditions if use_additional_conditions is not None else latent_size == 128,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=norm_eps,  # PixArt's; an imported DiT's own (t2i.import_dit)
        interpolation_scale=interpolation_scale,
        activation_fn="gelu-approximate",
        attention_bias=True,
    )
    initialize_weights(model)
    return model


def xavier_linears_and_patch(model) -> None:
    """What every DiT-family initialisation starts with: xavier-uniform linears with zero bias, and
    the patch embedding's convolution initialised as the linear it is."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def initialize_weights(model) -> None:
    """DiT/PixArt initialisation: xavier linears, zero cross-attention output and final projection."""
    xavier_linears_and_patch(model)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.normal_(model.adaln_single.emb.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(model.adaln_single.emb.timestep_embedder.linear_2.weight, std=0.02)
    nn.init.normal_(model.adaln_single.linear.weight, std=0.02)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


class PixArtWithNull(nn.Module):
    """The trained unit: the transformer plus a trainable null caption (tokens x channels).

    During training a caption is replaced by the null caption with probability `caption_dropout`
    (its mask is all ones); at sampling time the null caption is the unconditional branch of
    classifier-free guidance (passed as `negative_prompt_embeds`).
    """

    def __init__(self, transformer, max_tokens: int) -> None:
        super().__init__()
        self.transformer = transformer
        c = transformer.config.caption_channels
        # the official PixArt buffer's initialisation, but a parameter: it is learned here
        self.null_caption = nn.Parameter(torch.randn(max_tokens, c) / c**0.5)
        # the null caption's attended tokens: 0, all of them (a learned null); k, its first k (the
        # text encoder's padded empty prompt, as a released pipeline's unconditional branch: t2i.text_cond)
        self.null_tokens = 0

    def forward(self, latents, timesteps, captions, caption_mask, drop=None, added_cond_kwargs=None):
        # always through torch.where (even when nothing is dropped): the null caption stays in the
        # graph, so DDP never sees an unused parameter, and there is no host sync on `drop`
        if drop is not None:
            d = drop.view(-1, 1, 1)
            captions = torch.where(d, self.null_caption.to(captions.dtype)[None], captions)
            caption_mask = torch.where(drop.view(-1, 1), null_mask(caption_mask, self.null_tokens), caption_mask)
        return self.transformer(
            latents,
            encoder_hidden_states=captions,
            encoder_attention_mask=caption_mask,
            timestep=timesteps,
            added_cond_kwargs=added_cond_kwargs or {"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]


def null_mask(like: torch.Tensor, null_tokens: int) -> torch.Tensor:
    """The null caption's attention mask, shaped and typed as `like` (batch x tokens): ones, or
    ones on the first `null_tokens` tokens only."""
    if not null_tokens:
        return torch.ones_like(like)
    return (torch.arange(like.shape[-1], device=like.device) < null_tokens).to(like.dtype).expand_as(like)


# SDPA kernel orders for `TrainConfig.attention`: torch tries them in order and takes the first that
# accepts the call (flash takes no attention mask, so masked cross-attention falls to the next one).
ATTENTION_ORDERS = {
    "auto": None,  # torch's own order
    "flash": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"],
    "efficient": ["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"],
    "cudnn": ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
}


def attention_kernels(name: str):
    """A context manager that makes SDPA prefer the kernels of ATTENTION_ORDERS[name]."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in ATTENTION_ORDERS:
        raise UserError(f"attention {name!r} is not one of {', '.join(ATTENTION_ORDERS)}: pick one")
    order = ATTENTION_ORDERS[name]
    if order is None:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, b) for b in order], set_priority=True)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional torch.compile: every transformer block is compiled in place. The blocks share one
    forward and one set of shapes, so dynamo traces one block and reuses the graph for all of
    them: XL/2 compiles in the time of one block instead of 28, and the state-dict keys do not
    change (no `_orig_mod.` prefix). The small layers outside the blocks stay eager."""
    blocks = model.transformer.transformer_blocks if hasattr(model, "transformer") else model.transformer_blocks
    for block in blocks:
        block.compile(backend=backend)


def flops_per_image(preset: str | Preset, latent_hw: tuple[int, int], caption_tokens: int = 120, caption_channels: int = 4096,
                    cross_attention: bool = True, token_drop: float = 0.0, routed_blocks: int = 0, token_macs: int = 0,
                    kv_compress: int = 1, kv_blocks: int = 0) -> float:
    """Training FLOPs for one image (forward + backward = 3x forward), counting matmuls only.

    Per block: self-attention qkv/out (4 h^2 per token), cross-attention q/out (2 h^2 per token)
    and k/v over the caption (2 h^2 per caption token), MLP (8 h^2 per token), attention scores
    and weighted sums (2 T^2 h + 2 T L h). Plus the caption projection. x2 for multiply-add.
    `cross_attention=False`: a class-conditional DiT (no cross-attention, no caption projection).
    `token_drop`: `routed_blocks` of the blocks see only the tokens kept by routing
    (t2i.routing: T - floor(token_drop T) of them). `token_macs`: multiply-adds per token of
    modules outside the blocks that train with the model (REPA's projector, t2i.repa), on every token.
    `kv_compress`: in `kv_blocks` blocks self-attention attends to T / r^2 key/value tokens
    (t2i.sigma), plus the depthwise r x r convolution over the keys and values (h per token each).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    h = p.hidden
    t = (latent_hw[0] // p.patch) * (latent_hw[1] // p.patch)
    if not cross_attention:
        caption_tokens = 0

    def per_block(t: int, kv: int) -> int:
        return t * (4 + 2 * cross_attention + 8) * h * h + caption_tokens * 2 * h * h + 2 * t * kv * h + 2 * t * caption_tokens * h

    routed = routed_blocks if token_drop else 0
    kv_blocks = kv_blocks if kv_compress > 1 else 0
    kv = (latent_hw[0] // p.patch // kv_compress) * (latent_hw[1] // p.patch // kv_compress)
    blocks = (p.depth - routed - kv_blocks) * per_block(t, t) + routed * per_block(t - int(token_drop * t), t - int(token_drop * t))
    blocks += kv_blocks * (per_block(t, kv) + 2 * t * h)
    caption_proj = caption_tokens * (caption_channels * h + h * h)
    patch = t * (LATENT_CHANNELS * p.patch**2) * h * 3  # patch embed in, 8 channels out
    forward_macs = blocks + caption_proj + patch + t * token_macs
    return 3 * 2 * forward_macs


def preset_of(config) -> Preset:
    """The Preset shape of a PixArtTransformer2DModel config (works for imported/custom models too)."""
    return Preset(
        depth=config.num_layers,
        hidden=config.num_attention_heads * config.attention_head_dim,
        heads=config.num_attention_heads,
        patch=config.patch_size,
    )


# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def device_peak_flops(device: torch.device | str) -> float | None:
    """Peak FLOP/s of the current CUDA device from a small table, or None (CPU / unknown)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None
