"""Preference scores (`--preference`, HF id or local directory): CLIP-architecture reward models,
PickScore (yuvalkirstain/PickScore_v1) and HPSv2 converted to a transformers `CLIPModel`, and
ImageReward (THUDM/ImageReward: BLIP with an MLP head, evals.imagereward). `load_preference` tells
them apart: a directory holding ImageReward.pt or med_config.json, or a hub repository with
med_config.json, is ImageReward; anything else loads as a CLIPModel.

A CLIP preference model's score of an image for its prompt is the model's own logit: exp(logit_scale)
x the cosine of the image and text embeddings (PickScore's definition; HPSv2's score is the same
with its scale of 100). ImageReward's is its normalised reward (evals.imagereward). Per checkpoint,
the report gives each model's mean over the suite's prompts.

CLIP models load through shards.models.clip.ClipEmbedder (shards.hub.load_pretrained: a hub id that
cannot be reached, or a folder that holds no CLIPModel, is one line within seconds). HPSv2's official
weights are an open_clip checkpoint, not a transformers folder: they load here only once converted to
a CLIPModel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from shards.errors import UserError
from shards.fs import write_text

_NEITHER = "--preference {model} is not a preference model (no CLIPModel config.json, no ImageReward.pt): {fix}"

if TYPE_CHECKING:
    from evals.imagereward import ImageRewardScorer


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


def load_preference(model: str, device: str | None = None) -> "PreferenceScorer | ImageRewardScorer":
    """The preference model `model` (id or directory), ImageReward or a CLIPModel; one line when it is neither."""
    from evals.imagereward import FIX, ImageRewardScorer, is_imagereward

    if is_imagereward(model):
        return ImageRewardScorer(model, device)
    _refuse_folder_without_config(model, FIX)  # a hub id, or a CLIPModel folder that does not load: the CLIP loader's own line
    return PreferenceScorer(model, device)


def check_preference(model: str) -> None:
    """The check before any work (one line within seconds): the model, and ImageReward's tokenizer."""
    from evals.imagereward import FIX, check, is_imagereward
    from shards.hub import check_model

    if is_imagereward(model):
        return check(model)
    check_model(model, "preference model", "--preference")
    _refuse_folder_without_config(model, FIX)


def _refuse_folder_without_config(model: str, fix: str) -> None:
    """One line for a directory that is neither ImageReward (asked first) nor a CLIPModel (no config.json)."""
    folder = Path(model).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(_NEITHER.format(model=model, fix=fix))


def score_folder(scorer: "PreferenceScorer | ImageRewardScorer", prompts: list[dict], folder: Path, batch: int = 16) -> float | None:
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
