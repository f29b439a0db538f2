"""`run_caption`: the whole caption job as one function (cli.py and the demo call it)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from shards.errors import UserError
from autolabel.backends import Captioner, GenParams, input_short_side, make_captioner
from autolabel.pipeline import PrepareOptions, Summary, caption_items
from autolabel.prompts import PAPER_PROMPT
from autolabel.sources import count_items, iter_sources, validate_sources

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


def run_caption(
    src: Sequence[str | Path],
    out: str | Path = "out",
    *,
    model: str = DEFAULT_MODEL,
    backend: str = "vllm",
    prompt: str | None = None,
    use_alt: bool = False,
    temperature: float = 0.2,
    max_new_tokens: int = 1024,
    seed: int = 0,
    batch_size: int = 32,
    shard_size: int = 1000,
    embed_images: bool = False,
    retry_failed: bool = False,
    workers: int | None = None,
    prefetch: int | None = None,
    max_short: int = 400,
    max_long: int = 800,
    progress: bool = True,
    captioner: Captioner | None = None,
    backend_kwargs: dict | None = None,
) -> Summary:
    """Caption every image of `src` into Parquet shards in `out`; rerunning resumes.

    Defaults are the released PixArt-alpha settings (LLaVA-1.5-7B, temperature 0.2, 1024 new
    tokens, batch 32, images within 400 short / 800 long side). `use_alt` switches to the
    caption-conditioned prompt for items with an alt-text. Pass a ready `captioner` to reuse a
    loaded model across calls (its backend/model then win over `backend`/`model`).
    """
    validate_sources(src)
    for name, v in (("--batch-size", batch_size), ("--shard-size", shard_size), ("--max-new-tokens", max_new_tokens)):
        if v < 1:
            raise UserError(f"{name} {v} must be at least 1: pass a positive number")
    if temperature < 0:
        raise UserError(f"--temperature {temperature} is negative: pass 0 (greedy) or more")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    params = GenParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    workers = workers or min(8, os.cpu_count() or 1)
    owns = captioner is None
    if captioner is None:
        captioner = make_captioner(backend, model, **(backend_kwargs or {}))
    config = {
        "src": [str(s) for s in src], "model": captioner.model_name, "backend": captioner.name,
        "prompt": prompt or PAPER_PROMPT, "use_alt": use_alt, **asdict(params), "batch_size": batch_size,
        "shard_size": shard_size, "embed_images": embed_images, "max_short": max_short, "max_long": max_long,
    }  # fmt: skip
    try:
        return caption_items(
            iter_sources(src), captioner, out, params, prompt=prompt, use_alt=use_alt, batch_size=batch_size,
            shard_size=shard_size, embed_images=embed_images, retry_failed=retry_failed, workers=workers,
            prefetch_depth=prefetch or max(2 * batch_size, 4 * workers),
            prepare_opts=PrepareOptions(max_short, max_long, min_short=input_short_side(captioner)), config=config,
            total=count_items(src) if progress else None, progress=progress,
        )  # fmt: skip
    finally:
        if owns:
            captioner.close()
