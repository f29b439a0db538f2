"""`run_caption`: the whole caption job as one function (cli.py, the demo and benchmarks call it).

    run_caption(CaptionConfig(src=["sam/"], out="out", backend="vllm")) -> Summary
    run_caption(["sam/"], "out", backend="vllm", ...)      # same, keyword form
    run_caption(config, captioner=loaded)                  # reuse a loaded model across calls
    run_caption(replace(config, engine="ray", replicas=4))  # Ray Data (autolabel.engine_ray)

The Summary (shards.job) has `captioned`, `failed`, `skipped` (already done), `retried`,
`seconds`, `shards` (all complete shard names in `out`) and `line()` (what the CLI prints).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Sequence

from shards import fs as shard_fs
from shards.checks import SEED, WORKERS, Range, check_output_dir, check_ranges
from shards.errors import UserError
from shards.hub import check_model
from shards.job import Run, Summary, job_run
from autolabel.backends import Captioner, make_captioner, size_policy_of
from autolabel.config import CaptionConfig
from autolabel.prompts import PROMPTS
from autolabel.pipeline import caption_items, caption_spec
from shards.images.sources import count_items, iter_sources, validate_sources

PROMPT_MODES = ("plain", "alt")
ENGINES = ("local", "ray")
# the upper ends of the numeric settings (their lower ends have their own messages in _validate)
CAPTION_RANGES = {"temperature": Range(0, 10), "max_new_tokens": Range(1, 32768), "seed": SEED,
                  "batch_size": Range(1, 65536), "shard_size": Range(1, 10_000_000), "workers": WORKERS,
                  "prefetch": Range(1, 1_000_000), "max_short": Range(1, 65536), "max_long": Range(1, 65536),
                  "min_pixels": Range(1, 10**9), "max_pixels": Range(1, 10**9), "replicas": Range(1, 4096)}


def run_caption(
    config: CaptionConfig | Sequence[str | Path],
    out: str | Path | None = None,
    *,
    captioner: Captioner | None = None,
    use_alt: bool | None = None,
    **settings: Any,
) -> Summary:
    """Caption every image of `config.src` into Parquet shards in `config.out`; rerunning resumes.

    `config` is a CaptionConfig, or (keyword form) the list of sources, with `out` and any
    CaptionConfig field as keywords (`use_alt=True` is `prompt_mode="alt"`). Pass a ready
    `captioner` to reuse a loaded model across calls (its backend/model then win over the
    config's). Bad input raises UserError before any model is loaded.
    """
    if isinstance(config, CaptionConfig):
        cfg = replace(config, **({"out": out} if out is not None else {}), **settings)
    else:
        unknown = set(settings) - {f.name for f in fields(CaptionConfig)}
        if unknown:
            raise TypeError(f"run_caption got unknown settings {sorted(unknown)}")
        cfg = CaptionConfig(src=list(config), out=out if out is not None else "out", **settings)
    if use_alt is not None:
        cfg = replace(cfg, prompt_mode="alt" if use_alt else "plain")
    _validate(cfg)
    check_output_dir(cfg.out)  # the output first: it fails in no time, a model check may take seconds
    if captioner is None:
        check_model(cfg.model, "caption model", "--model")  # a hub id in seconds, an empty folder: before any work
    if cfg.engine == "ray" and captioner is not None:
        raise UserError("a loaded captioner cannot be shipped to Ray actors: pass the model name (model=...) with engine='ray'")
    spec = caption_spec(cfg, captioner.model_name if captioner else cfg.model, captioner.name if captioner else cfg.backend)
    # one writer per --out (a Path, or an s3://, gs://, fsspec URI); settings checked before any model loads
    with job_run(spec) as run:
        return _run_on_ray(cfg, run) if cfg.engine == "ray" else _caption_local(cfg, run, captioner)


def caption_command(cfg: CaptionConfig) -> str:
    """`t2i-data caption`: the run, then what it prints (its summary and the shards in `out`)."""
    return run_caption(cfg).shards_line(cfg.out)


def _caption_local(cfg: CaptionConfig, run: Run, captioner: Captioner | None) -> Summary:
    """The caption job in this process (the model loaded here unless `captioner` is given)."""
    owns = captioner is None
    if captioner is None:
        captioner = make_captioner(cfg.backend, cfg.model, **cfg.captioner_kwargs())
    policy = size_policy_of(captioner)
    run.settings.update(cfg.recorded(captioner.model_name, captioner.name, policy))
    try:
        return caption_items(iter_sources(cfg.src), captioner, run, cfg, policy, total=count_items(cfg.src) if cfg.progress else None)
    finally:
        if owns:
            captioner.close()


def _run_on_ray(cfg: CaptionConfig, run: Run) -> Summary:
    """The same job on Ray Data: model replicas in Ray actors (autolabel.engine_ray)."""
    from autolabel.engine_ray import caption_with_ray  # Ray is imported only here
    from shards.ray_session import import_ray

    import_ray()  # the install hint before any work
    return caption_with_ray(cfg, run)


def _validate_prompts(cfg: CaptionConfig) -> None:
    names = list(cfg.prompts)
    if not names:
        return
    if [n for n in names if n not in PROMPTS] or len(set(names)) != len(names):
        raise UserError(f"--prompts {','.join(names)}: use distinct names from {', '.join(PROMPTS)}")
    if cfg.prompt is not None:
        raise UserError("--prompt and --prompts both given: pass one (--prompts takes names, --prompt a text)")


def _validate(cfg: CaptionConfig) -> None:
    """UserError one-liners for bad settings, before the (slow) model load. (The Ray engine
    checks its sources itself, as it lists them: they may be S3/GCS URIs.)"""
    if cfg.static_cache and cfg.backend != "transformers":
        raise UserError(f"--static-cache is a transformers-backend setting, not {cfg.backend}'s: "
                        "drop it or use --backend transformers")
    if cfg.engine != "ray":
        validate_sources(cfg.src)
    for name, v in (("--batch-size", cfg.batch_size), ("--shard-size", cfg.shard_size),
                    ("--max-new-tokens", cfg.max_new_tokens), ("--max-short", cfg.max_short), ("--max-long", cfg.max_long),
                    ("--min-pixels", cfg.min_pixels), ("--max-pixels", cfg.max_pixels)):  # fmt: skip
        if v is not None and v < 1:
            raise UserError(f"{name} {v} must be at least 1: pass a positive number")
    if cfg.temperature < 0:
        raise UserError(f"--temperature {cfg.temperature} is negative: pass 0 (greedy) or more")
    if cfg.prompt_mode not in PROMPT_MODES:
        raise UserError(f"unknown --prompt-mode {cfg.prompt_mode!r}: use plain or alt")
    _validate_prompts(cfg)
    if cfg.engine not in ENGINES:
        raise UserError(f"unknown --engine {cfg.engine!r}: use local or ray")
    if cfg.replicas < 1:
        raise UserError(f"--replicas {cfg.replicas} must be at least 1: pass a positive number")
    if cfg.backend not in ("vllm", "transformers"):
        raise UserError(f"unknown --backend {cfg.backend!r}: use vllm or transformers")
    check_ranges(cfg, CAPTION_RANGES)
    out = shard_fs.as_location(cfg.out)
    # a URI: unknown scheme, missing backend, bad credentials fail here, in one line, before any
    # model loads (both engines write from this process; on Ray, the driver)
    if shard_fs.is_file(out):
        raise UserError(f"--out {cfg.out} is a file: pass a directory")
    if cfg.engine != "ray" and next(iter_sources(cfg.src), None) is None:
        raise UserError(f"no images found in --src {', '.join(map(str, cfg.src))}: pass folders, .tar or .parquet files with images")
