"""PixArt-Sigma (arXiv 2403.04692) beside PixArt-alpha: the same DiT backbone with cross-attention
on diffusers' `PixArtTransformer2DModel`, trained on 300 T5 tokens with the SDXL VAE, with no
size/aspect micro-conditions (PixArtSigmaPipeline passes none), positions interpolated as
resolution / 512 (diffusers' `interpolation_scale`: 0.5 at 256 px, 2 at 1024, 4 at 2K), and
optional key/value token compression in self-attention.

A stage says which it is with `family` ("alpha" | "sigma"); sampling and `export` then use
`PixArtAlphaPipeline` or `PixArtSigmaPipeline`.

KV compression (`kv_compress` = the stride r > 1, on the blocks `kv_compress_layers`, all when
empty): in self-attention the keys and values of the H x W patch tokens go through a depthwise
r x r convolution with stride r (initialised as the r x r average) and a LayerNorm, so each query
attends to HW / r^2 tokens. It lives in an attention processor on the block's `attn1` (its weights
are `transformer_blocks.N.attn1.processor.*`), recorded in the transformer's config
(`kv_compress`, `kv_compress_layers`) so a checkpoint rebuilds it. diffusers' PixArt transformer
has no such layer, so a kv-compressed model cannot be exported as a diffusers pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shards.errors import UserError

FAMILIES = ("alpha", "sigma")
KV_KEYS = ("kv_compress", "kv_compress_layers")  # what the transformer's config records of KV compression


def check_family(cfg) -> None:
    """One line for a bad family or KV-compression setting (before any work)."""
    if cfg.family not in FAMILIES:
        raise UserError(f"family {cfg.family!r} is not one of {', '.join(FAMILIES)}: pick one (sigma: manifests/pixart-sigma.toml)")
    if not 1 <= cfg.kv_compress <= 16:
        raise UserError(f"kv_compress must be in [1, 16] (the stride of the key/value token compression; 1: off), got {cfg.kv_compress}")
    if cfg.kv_compress_layers and cfg.kv_compress == 1:
        raise UserError("kv_compress_layers without kv_compress: set kv_compress = 2 (the stride), or drop kv_compress_layers")
    if any(not isinstance(i, int) or i < 0 for i in cfg.kv_compress_layers):
        raise UserError(f"kv_compress_layers {list(cfg.kv_compress_layers)} must be block indices >= 0: fix the stage settings")
    if cfg.kv_compress > 1 and cfg.lora_rank and cfg.init.partition(":")[0] not in ("checkpoint", "previous"):
        raise UserError(f"kv_compress with LoRA from init {cfg.init}: the new compression layers would stay untrained: "
                        "train a kv-compressed stage in full first (then LoRA from its checkpoint), or drop kv_compress")
    if cfg.kv_compress > 1 and cfg.token_drop:
        raise UserError("kv_compress with token_drop: compression needs the whole patch grid, routing drops tokens: use one of them")


def pipeline_class(family: str | None):
    """The diffusers pipeline class of a family (alpha when unknown: checkpoints made before Sigma)."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    return PixArtSigmaPipeline if family == "sigma" else PixArtAlphaPipeline


def interpolation_scale(latent_size: int) -> float:
    """Sigma's position interpolation for a square latent side: resolution / 512 (latent / 64 for
    an 8x VAE), so the positions span the same range at every resolution."""
    return latent_size / 64


def resized_config(config, latent_size: int) -> dict:
    """Config overrides moving a Sigma transformer to `latent_size`: the positions keep their range
    (interpolation_scale scales with the side, as Sigma's pe_interpolation does between stages)."""
    old = config.get("interpolation_scale") or max(config["sample_size"] // 64, 1)
    return {"sample_size": latent_size, "interpolation_scale": old * latent_size / config["sample_size"]}


def resize(transformer, latent_size: int):
    """A Sigma transformer rebuilt for `latent_size` with the same weights (resized_config)."""
    config = {k: v for k, v in transformer.config.items() if k not in KV_KEYS}
    new = type(transformer).from_config({**config, **resized_config(config, latent_size)})
    new.load_state_dict(transformer.state_dict())
    return new


def check_sigma_model(transformer, what: str) -> None:
    """A Sigma stage's model must run in PixArtSigmaPipeline, which passes no size/aspect
    micro-conditions: one line for a model that needs them."""
    if getattr(transformer, "use_additional_conditions", False):
        raise UserError(f"{what} uses size/aspect micro-conditions, which PixArtSigmaPipeline does not pass: "
                        "train it as family = \"alpha\", or start the Sigma stage from a model without them")


class KVCompress(nn.Module):
    """diffusers attention processor for a PixArt block's self-attention with its keys and values
    compressed (depthwise r x r convolution, stride r, then LayerNorm) over the patch grid."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio
        self.sr = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio, groups=dim)
        nn.init.constant_(self.sr.weight, 1 / ratio**2)  # starts as the r x r average
        nn.init.zeros_(self.sr.bias)
        self.norm = nn.LayerNorm(dim)
        self.grid: tuple[int, int] | None = None  # the patch grid (rows, cols), set per forward (attach_kv_compress)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, w = self.grid if self.grid and self.grid[0] * self.grid[1] == n else (int(n**0.5),) * 2
        if h * w != n:
            raise UserError(f"kv_compress: {n} tokens are not the patch grid: use square latents or buckets of whole patches")
        x = self.sr(x.transpose(1, 2).reshape(b, c, h, w))
        return self.norm(x.flatten(2).transpose(1, 2))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("KVCompress is a self-attention processor without a mask")
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        # in q's dtype: under autocast the LayerNorm answers in float32
        k, v = (self.compress(proj(hidden_states)).to(q.dtype) for proj in (attn.to_k, attn.to_v))
        d = q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def compressed_layers(transformer) -> dict[int, int]:
    """{block index: stride} of the blocks whose self-attention compresses keys and values."""
    return {i: b.attn1.processor.ratio for i, b in enumerate(transformer.transformer_blocks) if isinstance(b.attn1.processor, KVCompress)}


def _set_grid(module, args, kwargs) -> None:
    """Forward pre-hook: each KVCompress processor learns the patch grid of this call's latents."""
    x = args[0] if args else kwargs["hidden_states"]
    p = module.config.patch_size
    for block in module.transformer_blocks:
        if isinstance(block.attn1.processor, KVCompress):
            block.attn1.processor.grid = (x.shape[-2] // p, x.shape[-1] // p)


def attach_kv_compress(transformer, ratio: int, layers=()) -> list[int]:
    """KV compression with stride `ratio` on blocks `layers` (all when empty), recorded in the
    transformer's config. Blocks already compressed keep their weights; another stride is one line.
    Returns the blocks that gained a (fresh) compression."""
    if ratio <= 1:
        return []
    depth = len(transformer.transformer_blocks)
    wanted = sorted(set(layers)) if layers else list(range(depth))
    if wanted and wanted[-1] >= depth:
        raise UserError(f"kv_compress_layers {wanted} reach past the model's {depth} blocks: use indices below {depth}")
    have = compressed_layers(transformer)
    clash = {i: r for i, r in have.items() if i in wanted and r != ratio}
    if clash:
        raise UserError(f"kv_compress {ratio}, but the init model compresses blocks {sorted(clash)} with stride "
                        f"{sorted(set(clash.values()))}: keep the init model's kv_compress")
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    added = [i for i in wanted if i not in have]
    for i in added:
        block = transformer.transformer_blocks[i]
        block.attn1.set_processor(KVCompress(dim, ratio).to(block.attn1.to_k.weight.device, block.attn1.to_k.weight.dtype))
    _record(transformer)
    return added


def _record(transformer) -> None:
    layers = compressed_layers(transformer)
    ratios = set(layers.values())
    transformer.register_to_config(kv_compress=ratios.pop() if ratios else 1, kv_compress_layers=sorted(layers))
    if layers and not getattr(transformer, "_t2i_kv_hook", None):
        transformer._t2i_kv_hook = transformer.register_forward_pre_hook(_set_grid, with_kwargs=True)


def pop_kv_config(config: dict) -> tuple[int, list[int]]:
    """(stride, layers) of KV compression that a saved transformer config records, removed from it
    (diffusers' PixArtTransformer2DModel takes no such arguments)."""
    ratio, layers = config.pop("kv_compress", 1), config.pop("kv_compress_layers", [])
    return int(ratio or 1), list(layers or [])


def check_resume(ck, saved: dict, cfg) -> None:
    """Refuse to resume with another family or KV compression than checkpoint `ck`'s."""
    theirs = (saved.get("family", "alpha"), int(saved.get("kv_compress", 1)), tuple(saved.get("kv_compress_layers", ())))
    ours = (cfg.family, cfg.kv_compress, tuple(cfg.kv_compress_layers))
    if theirs != ours:
        raise UserError(f"checkpoint {ck} was trained with family {theirs[0]} kv_compress {theirs[1]} kv_compress_layers "
                        f"{list(theirs[2])}, this run has {ours[0]} {ours[1]} {list(ours[2])}: resume with the checkpoint's, "
                        "or train into a new --out")


def check_exportable(config: dict, what: str) -> None:
    """One line when a transformer config records layers a diffusers PixArt pipeline cannot hold."""
    ratio, layers = pop_kv_config(dict(config))
    if ratio > 1:
        raise UserError(f"{what} compresses keys/values (kv_compress {ratio} on blocks {layers}), which diffusers' "
                        "PixArtTransformer2DModel cannot represent: sample it with `t2i-data sample`, or train without kv_compress to export")
