"""The settings of a caption run, as one object both engines (local and Ray) are handed."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

from shards.writer import ROWS_PER_SHARD
from autolabel.backends import GenParams
from autolabel.prompts import PAPER_PROMPT, PROMPTS
from autolabel.sizing import SizePolicy

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


@dataclass
class PrepareOptions:
    policy: SizePolicy  # the size the model's processor works from (autolabel.sizing)
    max_short: int | None = None  # the paper's limit (400 / 800) when set; None: the model's own size
    max_long: int | None = None
    max_pixels: int = 89_478_485  # decompression-bomb guard


@dataclass
class CaptionConfig:
    """Every setting of a caption run. Defaults are the released PixArt-alpha settings
    (LLaVA-1.5-7B on vLLM, temperature 0.2, 1024 new tokens, batch 32). Images are prepared at
    the size the model's processor works from (autolabel.sizing); `max_short=400, max_long=800`
    is the paper's limit on top; `min_pixels` / `max_pixels` go to pixel-count processors.

    prompt_mode: "plain" asks `prompt` (default: the paper's) for every image; "alt" asks the
    caption-conditioned prompt for images with an alt-text and `prompt` for the others.
    prompts: several named prompts per image in one pass (`--prompts dense,short`); the first
    replaces `prompt` and fills `caption`, each other fills `caption_<name>`.
    backend_kwargs go to the backend's constructor (e.g. dtype, max_model_len, run_dir);
    static_cache (transformers backend only) too.
    engine: "local" (this process) or "ray" (a Ray Data pipeline, autolabel.engine_ray: at
    `ray_address`, or a local Ray when None; `replicas` model actors, one GPU each when the
    cluster has GPUs).

    IDENTITY: the settings a resume must keep (they shape the rows; shards.job refuses a change
    while the output holds shards). Sources, batch and shard sizes, workers, backend and engine
    may change on resume.
    """

    IDENTITY: ClassVar[tuple[str, ...]] = ("model", "prompt", "prompt_mode", "prompts", "temperature", "max_new_tokens", "seed",
                                           "embed_images", "max_short", "max_long", "min_pixels", "max_pixels")  # fmt: skip

    src: Sequence[str | Path] = ()
    out: str | Path = "out"
    model: str = DEFAULT_MODEL
    backend: str = "vllm"
    prompt: str | None = None
    prompt_mode: str = "plain"
    prompts: Sequence[str] | str = ()  # names of autolabel.prompts.PROMPTS, e.g. ("dense", "short") or "dense,short"
    temperature: float = 0.2
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 32
    shard_size: int = ROWS_PER_SHARD
    embed_images: bool = False
    retry_failed: bool = False
    workers: int | None = None  # image preparation threads (default: cores, at most 8)
    prefetch: int | None = None  # prepared images in flight (default: max(2 x batch, 4 x workers))
    max_short: int | None = None  # None: the model's own input size (autolabel.sizing); 400/800: the paper's limit
    max_long: int | None = None
    min_pixels: int | None = None  # pixel-count processors (Qwen-VL) only; default: theirs,
    max_pixels: int | None = None  # max capped at autolabel.sizing.DEFAULT_MAX_PIXELS
    progress: bool = True
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    engine: str = "local"
    ray_address: str | None = None
    replicas: int = 1
    static_cache: bool = False  # transformers backend: a fixed-size KV cache (compiled on GPU)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):  # the CLI's comma-separated names
            self.prompts = [p.strip() for p in self.prompts.split(",") if p.strip()]

    @property
    def use_alt(self) -> bool:
        return self.prompt_mode == "alt"

    def gen_params(self) -> GenParams:
        return GenParams(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed)

    def prepare_workers(self) -> int:
        return self.workers or min(8, os.cpu_count() or 1)

    def prefetch_depth(self) -> int:
        return self.prefetch or max(2 * self.batch_size, 4 * self.prepare_workers())

    def prepare_options(self, policy: SizePolicy) -> PrepareOptions:
        return PrepareOptions(policy, self.max_short, self.max_long)

    def captioner_kwargs(self) -> dict[str, Any]:
        """The backend's constructor arguments: `backend_kwargs`, plus the pixel limits and the
        static cache when set."""
        limits = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v is not None}
        return {**self.backend_kwargs, **limits, **({"static_cache": True} if self.static_cache else {})}

    def first_prompt(self) -> str | None:
        """The question behind `caption`: the first of `prompts`, else `prompt` (None: the paper's)."""
        return PROMPTS[self.prompts[0]] if self.prompts else self.prompt

    def extra_prompts(self) -> list[tuple[str, str]]:
        """(name, question) of every other prompt of `prompts`: each fills `caption_<name>`."""
        return [(name, PROMPTS[name]) for name in list(self.prompts)[1:]]

    def recorded(self, model: str, backend: str, policy: SizePolicy | None = None) -> dict[str, Any]:
        """What the shard manifest records of this run (with the model and backend that ran)."""
        rec = {"src": [str(s) for s in self.src], "model": model, "backend": backend,
               "prompt": self.first_prompt() or PAPER_PROMPT, "prompt_mode": self.prompt_mode, **asdict(self.gen_params()),
               "batch_size": self.batch_size, "shard_size": self.shard_size, "embed_images": self.embed_images,
               "max_short": self.max_short, "max_long": self.max_long, "min_pixels": self.min_pixels,
               "max_pixels": self.max_pixels}  # fmt: skip
        if policy is not None:
            rec["size_policy"] = policy.why
        if self.prompts:
            rec["prompts"] = list(self.prompts)
        if self.engine == "ray":
            rec.update(engine="ray", replicas=self.replicas)
        return rec
