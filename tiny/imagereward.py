"""A tiny random ImageReward checkpoint in ImageReward's own format, for tests (no download).

`build_tiny_imagereward(folder, corpus)` writes what THUDM/ImageReward publishes, at toy sizes:
`ImageReward.pt` (a state dict named as ImageReward's module names its tensors: `blip.visual_encoder.*`
for BLIP's timm-style ViT, `blip.text_encoder.*` for its BERT with cross-attention, the unused
`blip.vision_proj` / `blip.text_proj`, `mlp.layers.{0,2,4,6,7}`, and med.py's saved
`embeddings.position_ids` buffer), `med_config.json` (the published file's keys, with its
`encoder_width` left at 768 as there: BLIP replaces it with the ViT's width) and a WordPiece BERT
tokenizer over `corpus`'s words (with ImageReward's [DEC] and [ENC] added).

The tensors are written by name and shape from the ImageReward / BLIP source (vit.py, med.py,
ImageReward.py), not through evals.imagereward's mapping, so a test can check that mapping against
a forward written from the same source. Random: the scores mean nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vision(g: torch.Generator, width: int, layers: int, patch: int, image: int) -> dict[str, torch.Tensor]:
    """BLIP's VisionTransformer tensors (qkv with bias, MLP ratio 4), by their names in vit.py."""
    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    grid = (image // patch) ** 2
    sd = {"cls_token": r(1, 1, width, std=0.5), "pos_embed": r(1, grid + 1, width, std=0.5),
          "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
          "norm.weight": 1 + r(width), "norm.bias": r(width)}  # fmt: skip
    for i in range(layers):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width), b + "norm2.weight": 1 + r(width),
               b + "norm2.bias": r(width), b + "attn.qkv.weight": r(3 * width, width, std=0.2), b + "attn.qkv.bias": r(3 * width),
               b + "attn.proj.weight": r(width, width, std=0.1), b + "attn.proj.bias": r(width),
               b + "mlp.fc1.weight": r(4 * width, width, std=0.1), b + "mlp.fc1.bias": r(4 * width),
               b + "mlp.fc2.weight": r(width, 4 * width, std=0.1), b + "mlp.fc2.bias": r(width)}  # fmt: skip
    return {f"blip.visual_encoder.{k}": v for k, v in sd.items()}


def _text(g: torch.Generator, med: dict, vision_width: int) -> dict[str, torch.Tensor]:
    """BLIP's med.py BertModel tensors (no token types, no pooler), a cross-attention in every layer."""
    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    h, inner, n = med["hidden_size"], med["intermediate_size"], med["max_position_embeddings"]
    sd = {"embeddings.position_ids": torch.arange(n).expand(1, -1).clone(),
          "embeddings.word_embeddings.weight": r(med["vocab_size"], h, std=1.0),
          "embeddings.position_embeddings.weight": r(n, h, std=0.5),
          "embeddings.LayerNorm.weight": 1 + r(h), "embeddings.LayerNorm.bias": r(h)}  # fmt: skip
    for i in range(med["num_hidden_layers"]):
        for part, kv_width in (("attention", h), ("crossattention", vision_width)):
            b = f"encoder.layer.{i}.{part}."
            sd |= {b + "self.query.weight": r(h, h, std=0.3), b + "self.query.bias": r(h),
                   b + "self.key.weight": r(h, kv_width, std=0.3), b + "self.key.bias": r(h),
                   b + "self.value.weight": r(h, kv_width, std=0.3), b + "self.value.bias": r(h),
                   b + "output.dense.weight": r(h, h, std=0.3), b + "output.dense.bias": r(h),
                   b + "output.LayerNorm.weight": 1 + r(h), b + "output.LayerNorm.bias": r(h)}  # fmt: skip
        b = f"encoder.layer.{i}."
        sd |= {b + "intermediate.dense.weight": r(inner, h, std=0.2), b + "intermediate.dense.bias": r(inner),
               b + "output.dense.weight": r(h, inner, std=0.2), b + "output.dense.bias": r(h),
               b + "output.LayerNorm.weight": 1 + r(h), b + "output.LayerNorm.bias": r(h)}  # fmt: skip
    return {f"blip.text_encoder.{k}": v for k, v in sd.items()}


def _head(g: torch.Generator, width: int, dims: Sequence[int]) -> dict[str, torch.Tensor]:
    """ImageReward's MLP: Linear layers at Sequential indices 0, 2, 4, 6, 7 (dropouts between)."""
    sd, last = {}, width
    for index, out in zip((0, 2, 4, 6, 7), (*dims, 1)):
        sd[f"mlp.layers.{index}.weight"] = torch.randn(out, last, generator=g) / last**0.5
        sd[f"mlp.layers.{index}.bias"] = torch.randn(out, generator=g) * 0.1
        last = out
    return sd


def tiny_tokenizer(corpus: Sequence[str]):
    """A BERT WordPiece tokenizer (lower case) whose vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK], the
    words of `corpus`, [DEC] and [ENC] (ImageReward adds those two to bert-base-uncased's)."""
    from transformers import BertTokenizer

    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(SPECIAL + words)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_tiny_imagereward(folder: str | Path, corpus: Sequence[str], vision_width: int = 128, vision_layers: int = 2,
                           patch: int = 8, image_size: int = 32, text_width: int = 32, text_layers: int = 2,
                           head_dims: Sequence[int] = (24, 16, 8, 4), seed: int = 0) -> Path:
    """Write a tiny ImageReward (ImageReward.pt + med_config.json + tokenizer) to `folder`; returns it.
    The ViT has vision_width / 64 heads (BLIP's 64 channels per head), the text encoder 2."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(corpus)
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": text_width, "initializer_range": 0.02,
           "intermediate_size": 2 * text_width, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
           "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": text_layers, "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": len(tokenizer), "encoder_width": 768, "add_cross_attention": True}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    state = _vision(g, vision_width, vision_layers, patch, image_size) | _text(g, med, vision_width)
    state |= {"blip.vision_proj.weight": torch.randn(16, vision_width, generator=g), "blip.vision_proj.bias": torch.zeros(16),
              "blip.text_proj.weight": torch.randn(16, text_width, generator=g), "blip.text_proj.bias": torch.zeros(16)}  # fmt: skip
    state |= _head(g, text_width, head_dims)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=2))
    tokenizer.save_pretrained(folder)
    return folder
