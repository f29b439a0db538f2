"""The conditioning of a text-to-image (PixArt) stage: each image's caption as its T5 features
(stored by t2i.features), cross-attended by the model, and a learned null caption that stands in
for a caption dropped with probability `caption_dropout` (t2i.models.PixArtWithNull). Samples come
from diffusers' PixArtAlphaPipeline with the null caption as the unconditional branch (t2i.pipeline).
"""

from __future__ import annotations

from pathlib import Path

import torch

from shards.errors import UserError
from shards.hub import is_hub_id, load_pretrained
from t2i import checkpoint as ckpt
from t2i.conditioning import Conditioning
from t2i.dit_source import dit_directory
from t2i.import_dit import import_dit
from t2i.models import PixArtWithNull, build_transformer, get_preset
from t2i.objective import check_init_objective
from t2i.pipeline import generate, pipeline_from_checkpoint


class TextConditioning(Conditioning):
    """Text captions (T5 features + learned null caption). Nothing to read before training (the
    captions come with the features), no files beyond the trainer's (the null caption is in the
    weights); a stage after a class-cond one starts from its DiT through import-dit."""

    kind = "text-to-image"
    cross_attention = True  # the model attends to the caption tokens (FLOPs count them)
    guidance = 4.5  # the sampler's default classifier-free guidance
    handoff = "checkpoint"  # how a later stage starts from this one: its checkpoint

    def build_model(self, cfg, latent_size: int, caption_channels: int, learned_sigma: bool = True) -> PixArtWithNull:
        """PixArtWithNull from the stage's `init`: scratch, dit:PATH, pixart:DIR or checkpoint:DIR (a
        model trained to predict something else than the stage's objective is taken, with a
        warning; one trained with another kind of objective, DDPM or flow, is refused)."""
        from diffusers import PixArtTransformer2DModel

        kind, _, arg = cfg.init.partition(":")
        null = None
        # size/aspect micro-conditions at 1024 px, as PixArt-XL-2-1024-MS (diffusers ties them to latent 128)
        micro = cfg.resolution >= 1024
        if kind == "scratch":
            if micro and get_preset(cfg.preset).hidden % 3:
                raise UserError(f"{cfg.preset} at {cfg.resolution} px: size/aspect embeddings need hidden divisible by 3: use a PixArt-*/2 preset or a lower resolution")
            tr = build_transformer(cfg.preset, latent_size, caption_channels, learned_sigma=learned_sigma, use_additional_conditions=micro)
        elif kind == "dit":
            check_init_objective(vars(cfg), dit_directory(arg)[0] if Path(arg).is_dir() else Path(arg))  # a .pt: ImageNet DDPM
            tr, _ = import_dit(arg, caption_channels=caption_channels, latent_size=latent_size)
        elif kind == "pixart":
            check_init_objective(vars(cfg), Path(arg))
            sub = "transformer" if (Path(arg) / "transformer").is_dir() or is_hub_id(arg) else None  # a pipeline's, or the model itself
            tr = load_pretrained(PixArtTransformer2DModel.from_pretrained, arg, "PixArt model", "init pixart:", subfolder=sub)
        elif kind == "checkpoint":
            ck = ckpt.require_checkpoint(arg)
            check_init_objective(vars(cfg), ck)
            tr, null = ckpt.load_transformer(ck, which="model", sample_size=latent_size, use_additional_conditions=micro)
        else:
            raise UserError(f"init {cfg.init!r} is not scratch, dit:PATH, pixart:DIR or checkpoint:DIR: fix the stage's init")
        if tr.config.caption_channels != caption_channels:
            raise UserError(f"init model expects {tr.config.caption_channels}-d captions, the text encoder gives {caption_channels}: use the matching text encoder")
        if tr.config.sample_size != latent_size:
            tr.register_to_config(sample_size=latent_size)
        model = PixArtWithNull(tr.float(), cfg.max_tokens)
        if null is not None and null.shape == model.null_caption.shape:
            with torch.no_grad():
                model.null_caption.copy_(null)
        return model

    def inputs(self, batch) -> dict[str, torch.Tensor]:
        """The model's conditioning inputs for a batch: its caption features and their mask."""
        return {"captions": batch.text, "caption_mask": batch.mask}

    @classmethod
    def images(cls, checkpoint: str | Path, prompts: list[str], steps: int = 20, guidance: float | None = None,
               seed: int = 0, vae: str | None = None, text_encoder: str | None = None, which: str = "ema",
               dtype: torch.dtype = torch.float32) -> list:
        """Samples of a text-to-image checkpoint through its PixArtAlphaPipeline (in `dtype`)."""
        pipe, null = pipeline_from_checkpoint(checkpoint, vae, text_encoder, which, dtype=dtype)
        return generate(pipe, null, prompts, steps, cls.guidance if guidance is None else guidance, seed)

