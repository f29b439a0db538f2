"""The `clip` scorer: CLIP image and text embeddings and their cosine (CLIPScore).

Any transformers `CLIPModel` directory or HF id (default openai/clip-vit-large-patch14, the
embedding the LAION aesthetic predictor was trained on). Embeddings are L2-normalised and kept
in the score shards, so the aesthetic head and near-duplicate search reuse them.

`embed_texts` cuts a text at the model's window (77 tokens for OpenAI's CLIPs); `window_scores`
scores a long text in overlapping windows instead (`windows`), so what a dense caption says after
its first 77 tokens counts too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from shards.models import DEFAULT_CLIP


class ClipEmbedder:
    """A loaded CLIP model with its tokenizer and image processor."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str | None = None, flag: str = "--clip-model") -> None:
        """Load `model` (checked first, shards.hub: one line within seconds for a hub id that
        cannot be reached or a folder that holds no CLIP) on `device` (default: CUDA when there
        is one, else the CPU); `flag` names the option it came from in errors."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from shards.hub import load_pretrained

        self.name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_pretrained(CLIPModel.from_pretrained, model, "CLIP model", flag).to(self.device).eval()
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, "CLIP model", flag)
        self.processor = load_pretrained(CLIPImageProcessor.from_pretrained, model, "CLIP model", flag)
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.dim = self.model.config.projection_dim

    @property
    def input_size(self) -> int:
        """The short side the vision tower sees (what decoding needs at least)."""
        return int(self.model.config.vision_config.image_size)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32, unit length."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=pixels)
        return _unit(_features(out))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, unit length; long captions are cut at the model's token limit."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return _unit(_features(out))


    def windows(self, text: str) -> list[str]:
        """`text` in overlapping pieces of at most the model's window (its positions less the start
        and end tokens), half a window apart, the last ending with the text; [text] when it fits
        (or when the tokenizer gives no character offsets: a slow tokenizer)."""
        span = self.max_tokens - 2
        try:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except NotImplementedError:
            return [text]
        if len(offsets) <= span:
            return [text]
        starts = list(range(0, len(offsets) - span, max(1, span // 2))) + [len(offsets) - span]
        return [text[offsets[s][0] : offsets[s + span - 1][1]] for s in starts]

    def window_scores(self, image_emb: np.ndarray, texts: Sequence[str], batch: int = 8) -> np.ndarray:
        """The mean cosine of each unit image embedding with its text's windows, (n, dim), n -> (n,)."""
        pieces, owner = [], []
        for k, text in enumerate(texts):
            cut = self.windows(text)
            pieces += cut
            owner += [k] * len(cut)
        if not pieces:
            return np.zeros(0, np.float32)
        # embedded shortest first, so a batch pads to its own longest piece (a short caption is
        # not padded to a full window), then put back in order; batches of 8: on CPU, CLIP's
        # text tower costs more per piece in large batches (128 windows of ViT-B/32's: 13.2 s
        # CPU in batches of 64, 9.8 s in batches of 8)
        by_length = np.argsort([len(p) for p in pieces], kind="stable")
        emb = np.empty((len(pieces), self.dim), np.float32)
        for i in range(0, len(pieces), batch):
            at = by_length[i : i + batch]
            emb[at] = self.embed_texts([pieces[j] for j in at])
        owner_ = np.asarray(owner)
        cosines = np.einsum("nd,nd->n", np.asarray(image_emb, np.float32)[owner_], emb)
        return (np.bincount(owner_, cosines, len(texts)) / np.bincount(owner_, minlength=len(texts))).astype(np.float32)


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (older transformers) or an output with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Cosine of each image with its own caption (rows are unit length)."""
    return np.einsum("nd,nd->n", image_emb, text_emb)
