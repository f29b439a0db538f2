"""What a stage's model is conditioned on: the `Conditioning` interface.

Kinds (t2i.kinds.KINDS, chosen by a stage's `kind`, recorded in every checkpoint's config):
- "text-to-image": t2i.text_cond.TextConditioning, captions as T5 features, a learned null
  caption and caption dropout (PixArt);
- "class-cond": t2i.class_cond.ClassConditioning, class labels from a caption-shard column, a
  null class and label dropout (a class-conditional DiT, stage 1 of the recipe).

The trainer, the stage runner, the sampler and the trackers go through this interface only:
model building, a batch's conditioning inputs, whether the model cross-attends (FLOPs), what a
checkpoint carries besides the trainer's files, sampling, and how the next stage of a manifest
starts from this one. A new kind is one subclass, registered in t2i.kinds.KINDS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch


class Conditioning:
    """The conditioning of one stage: made by `open` (the class methods also serve before any
    work and for sampling), then asked for the model and for each batch's inputs. The defaults
    here are a kind's that needs nothing beyond the trainer's own checks and files."""

    kind: str = ""  # the stage's `kind`
    cross_attention: bool = True  # the model attends to caption tokens (counted in its FLOPs)
    guidance: float = 4.5  # the sampler's default classifier-free guidance
    handoff: str = "checkpoint"  # the init prefix with which a later text-to-image stage starts from this one

    @staticmethod
    def check_config(cfg) -> None:
        """A UserError for settings this kind cannot train with (before any work)."""

    @staticmethod
    def check_shards(cfg, shards) -> None:
        """A UserError for caption shards this kind cannot read (before the features step)."""

    @staticmethod
    def init_from_previous(previous: type[Conditioning]) -> str:
        """The init prefix with which this stage starts from the previous stage's checkpoints
        (init = "previous"): as that stage hands them on."""
        return previous.handoff

    @classmethod
    def open(cls, cfg, out: Path, shards, resume: bool, accel) -> Conditioning:
        """The conditioning of the stage training into `out` (reading what it needs from `shards`)."""
        return cls()

    def build_model(self, cfg, latent_size: int, caption_channels: int, learned_sigma: bool = True) -> torch.nn.Module:
        """The trained unit from the stage's init, called as
        model(x_t, t, **inputs(batch), drop=drop, added_cond_kwargs=added)."""
        raise NotImplementedError

    def inputs(self, batch) -> dict[str, torch.Tensor]:
        """The model's conditioning inputs for a batch (CPU tensors, keyword arguments of the model)."""
        raise NotImplementedError

    def checkpoint_extras(self, weights: dict[str, torch.Tensor],
                          ema: dict[str, torch.Tensor]) -> Callable[[Path], None] | None:
        """What completes a checkpoint being written (called with its directory), or None."""
        return None

    @classmethod
    def images(cls, checkpoint: str | Path, prompts: list[str], steps: int = 20, guidance: float | None = None,
               seed: int = 0, vae: str | None = None, text_encoder: str | None = None, which: str = "ema",
               dtype: torch.dtype = torch.float32) -> list:
        """PIL samples of `prompts` from a checkpoint of this kind (guidance None: the kind's default)."""
        raise NotImplementedError
