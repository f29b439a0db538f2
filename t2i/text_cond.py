"""The conditioning of a text-to-image (PixArt) stage: each image's caption as its T5 features
(stored by t2i.features), cross-attended by the model, and a learned null caption that stands in
for a caption dropped with probability `caption_dropout` (t2i.models.PixArtWithNull). Samples come
from diffusers' PixArtAlphaPipeline (PixArtSigmaPipeline for a Sigma stage, t2i.sigma) with the null
caption as the unconditional branch (t2i.pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shards.errors import UserError
from shards.hub import is_hub_id, load_pretrained
from t2i import checkpoint as ckpt
from t2i import sigma
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
        warning; one trained with another kind of objective, DDPM or flow, is refused). A Sigma
        stage's model runs in PixArtSigmaPipeline; `kv_compress` adds its compression (t2i.sigma)."""
        tr, null, null_tokens = init_transformer(cfg, latent_size, caption_channels, learned_sigma)
        if tr.config.caption_channels != caption_channels:
            raise UserError(f"init model expects {tr.config.caption_channels}-d captions, the text encoder gives {caption_channels}: use the matching text encoder")
        if tr.config.sample_size != latent_size:
            tr.register_to_config(sample_size=latent_size)
        if getattr(cfg, "family", "alpha") == "sigma":
            sigma.check_sigma_model(tr, f"init {cfg.init}")
        added = sigma.attach_kv_compress(tr, getattr(cfg, "kv_compress", 1), getattr(cfg, "kv_compress_layers", ()))
        if added and getattr(cfg, "lora_rank", 0):
            raise UserError(f"kv_compress adds new layers to blocks {added} of init {cfg.init}, which a LoRA stage would leave "
                            "untrained: train a kv-compressed stage in full first (then LoRA from it), or drop kv_compress")
        model = PixArtWithNull(tr.float(), cfg.max_tokens)
        if null is not None and null.shape == model.null_caption.shape:
            with torch.no_grad():
                model.null_caption.copy_(null)
            model.null_tokens = null_tokens
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


def init_transformer(cfg, latent_size: int, caption_channels: int, learned_sigma: bool):
    """(transformer, null caption or None, its attended tokens) of a stage's `init`."""
    kind, _, arg = cfg.init.partition(":")
    null, null_tokens = None, 0
    is_sigma = getattr(cfg, "family", "alpha") == "sigma"
    # size/aspect micro-conditions at 1024 px, as PixArt-XL-2-1024-MS (diffusers ties them to latent 128);
    # PixArt-Sigma's released models have none (PixArtSigmaPipeline passes none)
    micro = cfg.resolution >= 1024 and not is_sigma
    if kind == "scratch":
        if micro and get_preset(cfg.preset).hidden % 3:
            raise UserError(f"{cfg.preset} at {cfg.resolution} px: size/aspect embeddings need hidden divisible by 3: use a PixArt-*/2 preset or a lower resolution")
        tr = build_transformer(cfg.preset, latent_size, caption_channels, learned_sigma=learned_sigma, use_additional_conditions=micro,
                               interpolation_scale=sigma.interpolation_scale(latent_size) if is_sigma else None)
    elif kind == "dit":  # the DiT's own positions, no micro-conditions: exact for alpha and Sigma alike
        check_init_objective(vars(cfg), dit_directory(arg)[0] if Path(arg).is_dir() else Path(arg))  # a .pt: ImageNet DDPM
        tr, _ = import_dit(arg, caption_channels=caption_channels, latent_size=latent_size)
    elif kind == "pixart":
        check_init_objective(vars(cfg), Path(arg))
        check_pipeline_family(arg, getattr(cfg, "family", "alpha"))
        sub = "transformer" if (Path(arg) / "transformer").is_dir() or is_hub_id(arg) else None  # a pipeline's, or the model itself
        tr = load_pixart(arg, sub)
        if is_sigma and tr.config.sample_size != latent_size:
            tr = sigma.resize(tr, latent_size)
        null, null_tokens = empty_prompt(cfg.text_encoder, cfg.max_tokens)
    elif kind == "checkpoint":
        ck = ckpt.require_checkpoint(arg)
        check_init_objective(vars(cfg), ck)
        tr, null = ckpt.load_transformer(ck, which="model", **init_overrides(ck, latent_size, micro, is_sigma))
        null_tokens = ckpt.null_tokens_of(ck)
    else:
        raise UserError(f"init {cfg.init!r} is not scratch, dit:PATH, pixart:DIR or checkpoint:DIR: fix the stage's init")
    return tr, null, null_tokens


def init_overrides(ck: Path, latent_size: int, micro: bool, is_sigma: bool) -> dict:
    """The config a checkpoint's transformer takes on in a new stage: the stage's latent side (for
    Sigma, with positions keeping their range) and, for alpha, the micro-conditions of its resolution."""
    if not is_sigma:
        return {"sample_size": latent_size, "use_additional_conditions": micro}
    config = json.loads((ck / "transformer" / "config.json").read_text())
    return sigma.resized_config(config, latent_size) if config["sample_size"] != latent_size else {}


def check_pipeline_family(arg: str, family: str) -> None:
    """One line when a local PixArtSigmaPipeline folder starts an alpha stage (its model wants 300
    tokens and the SDXL VAE: likely a missed family = "sigma"). An alpha model starting a Sigma
    stage is Sigma's own weak-to-strong start, allowed (without micro-conditions: check_sigma_model)."""
    index = Path(arg) / "model_index.json"
    kind = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if kind == "PixArtSigmaPipeline" and family != "sigma":
        raise UserError(f"init pixart:{arg} is a {kind}, this stage is family = \"{family}\": set family = \"sigma\" "
                        "(manifests/pixart-sigma.toml: 300 tokens, the SDXL VAE), or start from another model")


def load_pixart(arg: str, sub: str | None):
    """A released PixArt transformer (diffusers layout: the model's own folder, or a pipeline's
    `transformer/`; a hub id), refused in one line when the folder holds another model."""
    from diffusers import PixArtTransformer2DModel

    check_pixart_folder(arg)
    return load_pretrained(PixArtTransformer2DModel.from_pretrained, arg, "PixArt model", "init pixart:", subfolder=sub)


def check_pixart_folder(arg: str) -> None:
    """One line when a local `pixart:` folder (the model's own, or a pipeline's `transformer/`)
    holds another model than a PixArtTransformer2DModel (a hub id is checked when it loads)."""
    for config in (Path(arg) / "transformer" / "config.json", Path(arg) / "config.json"):
        if config.is_file():
            kind = json.loads(config.read_text()).get("_class_name")
            if kind != "PixArtTransformer2DModel":
                raise UserError(f"init pixart:{arg} holds a {kind}, not a PixArtTransformer2DModel: pass a PixArt-alpha or -Sigma model "
                                "(its folder, or a pipeline folder with transformer/), or init dit:PATH for a DiT")
            return


def empty_prompt(text_encoder: str, max_tokens: int) -> tuple[torch.Tensor, int]:
    """(the text encoder's features of the empty prompt, padded to `max_tokens` as
    PixArtAlphaPipeline and PixArtSigmaPipeline pad their negative prompt; how many of its tokens the mask keeps): a released
    model's unconditional branch, so a stage from `pixart:` guides as the released pipeline does."""
    from t2i.encoders import encode_text, load_text_encoder

    tok, enc = load_text_encoder(text_encoder)
    emb, mask = encode_text(tok, enc, [""], max_tokens)
    return emb[0].float(), int(mask[0].sum())
