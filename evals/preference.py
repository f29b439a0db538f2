"""Preference scores by CLIP-architecture reward models: PickScore (yuvalkirstain/PickScore_v1)
and HPSv2 converted to a transformers `CLIPModel`, given by HF id or local directory (`--preference`).

A preference model's score of an image for its prompt is the model's own logit: exp(logit_scale)
x the cosine of the image and text embeddings (PickScore's definition; HPSv2's score is the same
with its scale of 100). Per checkpoint, the report gives the mean over the suite's prompts.

Loaded through shards.models.clip.ClipEmbedder (shards.hub.load_pretrained: a hub id that cannot be
reached, or a folder that holds no CLIPModel, is one line within seconds). HPSv2's official weights
are an open_clip checkpoint, not a transformers folder: they load here only once converted to a
CLIPModel. ImageReward (a BLIP with its own head) does not load through transformers: not supported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from shards.fs import write_text


class PreferenceScorer:
    """One preference model, loaded once for every checkpoint."""

    def __init__(self, model: str, device: str | None = None) -> None:
        from shards.models.clip import ClipEmbedder

        self.clip = ClipEmbedder(model, device, flag="--preference")
        self.name = model
        self.scale = float(self.clip.model.logit_scale.exp().item())

    def score(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        """exp(logit_scale) x cos(image, prompt), one per image."""
        cos = np.einsum("nd,nd->n", self.clip.embed_images(images), self.clip.embed_texts(prompts))
        return self.scale * cos


def score_folder(scorer: PreferenceScorer, prompts: list[dict], folder: Path, batch: int = 16) -> float | None:
    """Mean score of the suite's images in `folder` (`<id>.png`) for their prompts; cached in
    `folder/preference.json` per model (a rerun reads it)."""
    from shards.images import decode_image

    cache = folder / "preference.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if scorer.name in done:
        return done[scorer.name]
    have = [p for p in prompts if (folder / f"{p['id']}.png").is_file()]
    scores: list[float] = []
    for start in range(0, len(have), batch):
        part = have[start : start + batch]
        images = [decode_image((folder / f"{p['id']}.png").read_bytes()).image for p in part]
        scores += scorer.score(images, [p["prompt"] for p in part]).tolist()
    done[scorer.name] = float(np.mean(scores)) if scores else None
    write_text(cache, json.dumps(done, indent=1))
    return done[scorer.name]
