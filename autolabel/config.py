"""The settings of a caption run, as one object both engines (local and Ray) are handed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from autolabel.backends import GenParams
from autolabel.prompts import PAPER_PROMPT

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


@dataclass
class PrepareOptions:
    max_short: int = 400
    max_long: int = 800
    max_pixels: int = 89_478_485
    min_short: int | None = None  # the model's input size: JPEG draft decoding stops there


@dataclass
class CaptionConfig:
    """Every setting of a caption run. Defaults are the released PixArt-alpha settings
    (LLaVA-1.5-7B on vLLM, temperature 0.2, 1024 new tokens, batch 32, images within 400 short /
    800 long side).

    prompt_mode: "plain" asks `prompt` (default: the paper's) for every image; "alt" asks the
    caption-conditioned prompt for images with an alt-text and `prompt` for the others.
    backend_kwargs go to the backend's constructor (e.g. dtype, max_model_len, run_dir).
    engine: "local" (this process) or "ray" (a Ray Data pipeline, autolabel.engine_ray: at
    `ray_address`, or a local Ray when None; `replicas` model actors, one GPU each when the
    cluster has GPUs).
    """

    src: Sequence[str | Path] = ()
    out: str | Path = "out"
    model: str = DEFAULT_MODEL
    backend: str = "vllm"
    prompt: str | None = None
    prompt_mode: str = "plain"
    temperature: float = 0.2
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 1000
    embed_images: bool = False
    retry_failed: bool = False
    workers: int | None = None  # image preparation threads (default: cores, at most 8)
    prefetch: int | None = None  # prepared images in flight (default: max(2 x batch, 4 x workers))
    max_short: int = 400
    max_long: int = 800
    progress: bool = True
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: str = "local"
    ray_address: str | None = None
    replicas: int = 1

    @property
    def use_alt(self) -> bool:
        return self.prompt_mode == "alt"

    def gen_params(self) -> GenParams:
        return GenParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)

    def prepare_workers(self) -> int:
        return self.workers or min(8, os.cpu_count() or 1)

    def prefetch_depth(self) -> int:
        return self.prefetch or max(2 * self.batch_size, 4 * self.prepare_workers())

    def prepare_options(self, min_short: int | None = None) -> PrepareOptions:
        return PrepareOptions(self.max_short, self.max_long, min_short=min_short)

    def recorded(self, model: str, backend: str) -> dict[str, Any]:
        """What the shard manifest records of this run (with the model and backend that ran)."""
        rec = {"src": [str(s) for s in self.src], "model": model, "backend": backend, "prompt": self.prompt or PAPER_PROMPT,
               "prompt_mode": self.prompt_mode, **asdict(self.gen_params()), "batch_size": self.batch_size,
               "shard_size": self.shard_size, "embed_images": self.embed_images, "max_short": self.max_short,
               "max_long": self.max_long}  # fmt: skip
        if self.engine == "ray":
            rec.update(engine="ray", replicas=self.replicas)
        return rec
