"""`run_score`: the score job as a function (cli.py calls it); `run_select` is in curate.select.

    run_score(ScoreConfig(shards="out", out="scores", scorers="clip,aesthetic,dedup")) -> Summary

The run is the job skeleton's (shards.job: lock, settings checked and recorded, clean-up, done
keys, writer, ledger, manifest); this module supplies the engines around the per-batch function
both call, curate.scorers.score_batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from shards import fs
from shards.checks import WORKERS, Range, check_output_dir, check_ranges
from shards.errors import UserError
from shards.hub import check_model
from shards.job import JobSpec, Run, Summary, job_run
from shards.reader import Shard, open_shards
from shards.writer import ROWS_PER_SHARD
from shards.models import DEFAULT_CLIP
from curate.fit import INPUT_COLUMNS, input_batches
from curate.scorers import NEEDS_CLIP, TEXT_DETECTOR_NEEDED, ModelRefs, Scorers, decode_ahead, parse_scorers, score_batch, score_schema

DEDUP_DIR = "dedup"  # scores/dedup/: the whole-dataset duplicate pass, rebuilt after new rows
PHASH_DIR = "phash"  # scores/phash/: the perceptual-duplicate groups, rebuilt after new rows
# identity settings of the scorers added later: recorded only when their scorer runs, so a score
# directory made before them resumes as it was
SCORER_IDENTITY = {"watermark": ("watermark_weights", "fit_watermark"), "phash": ("phash_distance",),
                   "text": ("text_detector", "text_recognizer", "text_threshold", "text_min_coverage")}  # fmt: skip

# the settings that name models (a local folder or file is also recorded by its contents: shards.job)
SCORE_MODELS = ("clip_model", "aesthetic_weights", "watermark_weights", "text_detector", "text_recognizer")
SCORE_RANGES = {"dedup_threshold": Range(0, 1, lo_open=True), "batch_size": Range(1, 65536),
                "shard_size": Range(1, 10_000_000), "decode_short": Range(16, 8192), "workers": WORKERS,
                "replicas": Range(1, 4096), "phash_distance": Range(0, 12), "text_threshold": Range(0, 1, lo_open=True, hi_open=True),
                "text_min_coverage": Range(0, 1, lo_open=True)}  # fmt: skip  # dedup_threshold: a CLIP image cosine


@dataclass
class ScoreConfig:
    """Every setting of a score run (CLI flags map 1:1). IDENTITY: the settings a resume must
    keep (they shape the score rows); the others may change on resume."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("shards", "scorers", "clip_model", "aesthetic_weights", "fit_aesthetic",
                                           "dedup_threshold", "decode_short")  # fmt: skip

    shards: str | Path = "out"
    out: str | Path = "scores"
    scorers: str | list[str] = "clip,aesthetic,dedup,nsfw,lang,image"
    clip_model: str = DEFAULT_CLIP
    aesthetic_weights: str | None = None  # file or HF id of a LAION v2 head
    fit_aesthetic: str | Path | None = None  # ratings.parquet (key, rating): fit a head first
    dedup_threshold: float = 0.95
    watermark_weights: str | None = None  # file or HF id of a watermark head (curate.watermark)
    fit_watermark: str | Path | None = None  # labels.parquet (key, label 0/1): fit a watermark head first
    text_detector: str | None = None  # curate.text detector: .safetensors file, its folder or HF id
    text_recognizer: str | None = None  # transformers OCR model (TrOCR-style), HF id or folder: text itself
    text_threshold: float = 0.5  # a detector cell's text probability from which it counts as text
    text_min_coverage: float = 0.01  # the share of an image in text from which it has text
    phash_distance: int = 4  # Hamming distance (bits of 64) within which pHashes share a group
    batch_size: int = 32
    shard_size: int = ROWS_PER_SHARD
    decode_short: int = 448
    workers: int = 2
    progress: bool = True
    engine: str = "local"  # or "ray": the same per-batch function in Ray Data tasks
    ray_address: str | None = None
    replicas: int = 1  # --engine ray: concurrent scoring tasks (each loads the models once)

    def recorded(self, names: list[str]) -> dict[str, Any]:
        """What the run record and the manifest hold of this run (`names`: the parsed scorers)."""
        rec = {"shards": str(self.shards), "scorers": names, "clip_model": self.clip_model, "aesthetic_weights": self.aesthetic_weights,
               "fit_aesthetic": str(self.fit_aesthetic or ""), "dedup_threshold": self.dedup_threshold,
               "decode_short": self.decode_short, "batch_size": self.batch_size, "shard_size": self.shard_size}  # fmt: skip
        for name in (n for scorer in names for n in SCORER_IDENTITY.get(scorer, ())):
            rec[name] = str(getattr(self, name) or "") if name == "fit_watermark" else getattr(self, name)
        return {**rec, "engine": "ray"} if self.engine == "ray" else rec

    def identity(self, names: list[str]) -> tuple[str, ...]:
        """The settings a resume must keep: IDENTITY, and those of the later scorers in `names`."""
        return ScoreConfig.IDENTITY + tuple(n for scorer in names for n in SCORER_IDENTITY.get(scorer, ()))

    def refs(self, weights: str | None = None) -> ModelRefs:
        """The watermark head (`weights`: a fitted head's file, over --watermark-weights) and the text models."""
        return ModelRefs(weights or self.watermark_weights, self.text_detector, self.text_recognizer or None,
                         self.text_threshold, self.text_min_coverage)  # fmt: skip

    def validate(self) -> list[str]:
        """The scorers' names, after a one-line UserError for anything out of range or unknown,
        and for an output that cannot be written (before any shard is read or model loaded)."""
        names = parse_scorers(self.scorers)
        if self.engine not in ("local", "ray"):
            raise UserError(f"unknown --engine {self.engine!r}: use local or ray")
        check_ranges(self, SCORE_RANGES)
        check_output_dir(self.out)
        if any(n in NEEDS_CLIP for n in names):
            check_model(self.clip_model, "CLIP model", "--clip-model")  # in seconds, before the model code loads
        if "text" in names:
            _check_text_models(self.text_detector, self.text_recognizer)
        return names


def _check_text_models(detector: str | None, recognizer: str | None) -> None:
    """The text scorer's models exist (a file, a folder, a cached or reachable hub id): one line otherwise."""
    if not detector:
        raise UserError(TEXT_DETECTOR_NEEDED)
    if not Path(detector).expanduser().is_file():
        check_model(detector, "text detector", "--text-detector")
    if recognizer:
        check_model(recognizer, "text recogniser", "--text-recognizer")


def score_command(cfg: ScoreConfig) -> str:
    """`t2i-data score`: the run, then what it prints (its summary and the shards in `out`)."""
    return run_score(cfg).shards_line(cfg.out)


def score_line(s: Mapping[str, Any]) -> str:
    """The score summary's line: scored, unreadable, skipped (already done), rate, duplicates."""
    rate = (s["scored"] + s["failed"]) / s["seconds"] if s.get("seconds") else 0.0
    line = f"scored {s['scored']}, unreadable {s['failed']}, skipped as already done {s['skipped']} ({rate:.2f} images/s)"
    line += f"; {s['duplicates']} near-duplicates" if s.get("duplicates") is not None else ""
    return line + (f"; {s['phash_duplicates']} pHash copies" if s.get("phash_duplicates") is not None else "")


def run_score(cfg: ScoreConfig) -> Summary:
    """Score every caption row of `cfg.shards` not yet in `cfg.out`; rerunning resumes."""
    names = cfg.validate()
    spec = JobSpec("score", cfg.out, settings=cfg.recorded(names), identity=cfg.identity(names), schema=score_schema(names),
                   rows_per_shard=cfg.shard_size, summary=dict(scored=0, failed=0, skipped=0, duplicates=None, scorer_seconds={}),
                   describe=score_line, models=SCORE_MODELS)  # fmt: skip
    with job_run(spec) as run:  # one writer per scores directory, taken before any clean-up
        shards = open_shards(cfg.shards, "caption")  # no caption shards: say so before any model loads
        heads = _fit_heads(cfg, shards)
        if cfg.engine == "ray":
            _score_rows_ray(cfg, run, names, shards)
        else:
            scorers = Scorers.load(names, cfg.clip_model, cfg.aesthetic_weights, aesthetic_head=heads.get("aesthetic"), refs=cfg.refs(),
                                   watermark_head=heads.get("watermark"), decode_short=cfg.decode_short, workers=cfg.workers)  # fmt: skip
            _score_rows(cfg, run, scorers, shards)
            run.summary.scorer_seconds = {k: round(v, 3) for k, v in scorers.seconds.items()}
        s = run.summary
        run.writer.flush()
        _passes(cfg, run, names, fresh=s.scored + s.failed > 0)
        return run.finish(extra={"schema": "scores"}, images=s.scored + s.failed, scorer_seconds=s.scorer_seconds)


def _fit_heads(cfg: ScoreConfig, shards: list[Shard]) -> dict[str, Any]:
    """The heads fitted on the user's labels before scoring (saved into the score directory)."""
    from curate.fit import fit_aesthetic, fit_watermark

    heads = {}
    if cfg.fit_aesthetic:
        heads["aesthetic"] = fit_aesthetic(cfg, shards)
    if cfg.fit_watermark:
        heads["watermark"] = fit_watermark(cfg, shards)
    return heads


def _passes(cfg: ScoreConfig, run: Run, names: list[str], fresh: bool) -> None:
    """The whole-dataset passes of the chosen scorers (curate.passes): dedup/, phash/."""
    from curate.passes import rebuild

    if "dedup" in names:
        from curate.dedup import DEDUP_SCHEMA, find_duplicates

        run.summary.duplicates = rebuild(run.out, DEDUP_DIR, lambda: find_duplicates(run.out, cfg.dedup_threshold), DEDUP_SCHEMA,
                                         {"threshold": cfg.dedup_threshold}, fresh, "near_duplicate")  # fmt: skip
    if "phash" in names:
        from curate.phash_groups import PHASH_SCHEMA, find_phash_groups

        run.summary.phash_duplicates = rebuild(run.out, PHASH_DIR, lambda: find_phash_groups(run.out, cfg.phash_distance), PHASH_SCHEMA,
                                               {"distance": cfg.phash_distance}, fresh, "phash_duplicate")  # fmt: skip


def _score_rows(cfg: ScoreConfig, run: Run, scorers: Scorers, shards: list[Shard]) -> None:
    """The local engine: decode the next batch in threads while this one is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen: set[str] = set()

    def todo() -> Iterator[list[dict]]:
        for rows in input_batches(shards, cfg.batch_size):
            fresh = [r for r in rows if r["key"] not in run.done and r["key"] not in seen]
            run.summary.skipped += len(rows) - len(fresh)
            seen.update(r["key"] for r in fresh)
            if fresh:
                yield fresh

    with ThreadPoolExecutor(max(1, cfg.workers)) as pool, Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not cfg.progress
    ) as bar:
        task = bar.add_task("score", total=None)
        pending = None
        for rows in todo():
            ahead = (rows, decode_ahead(pool, rows, scorers))
            if pending is not None:
                _emit(pending, scorers, run)
                bar.advance(task, len(pending[0]))
            pending = ahead
        if pending is not None:
            _emit(pending, scorers, run)


def _score_rows_ray(cfg: ScoreConfig, run: Run, names: list[str], shards: list[Shard]) -> None:
    """The Ray engine: same per-batch function in Ray tasks, rows written here (one writer)."""
    from curate.engine_ray import score_with_ray
    from shards.ray_session import import_ray

    from curate.watermark import HEAD_FILE

    import_ray()
    weights = str(fs.join(run.out, "aesthetic-head.safetensors")) if cfg.fit_aesthetic else cfg.aesthetic_weights
    if "aesthetic" in names and not weights:
        raise UserError("the aesthetic scorer needs --aesthetic-weights FILE_OR_HF_ID or --fit-aesthetic ratings.parquet")
    if "watermark" in names and not (cfg.fit_watermark or cfg.watermark_weights):
        raise UserError("the watermark scorer needs --watermark-weights FILE_OR_HF_ID or --fit-watermark labels.parquet")
    s, seen = run.summary, set(run.done)
    refs = cfg.refs(str(fs.join(run.out, HEAD_FILE)) if cfg.fit_watermark else None)
    spec = (tuple(names), cfg.clip_model, weights, cfg.decode_short, refs)
    columns = [c for c in INPUT_COLUMNS if all(c in shard.columns for shard in shards)]
    paths = [str(shard.location) for shard in shards]
    for rows, seconds in score_with_ray(paths, columns, spec, run.done, cfg.batch_size, cfg.replicas, cfg.ray_address):
        for name, v in seconds.items():
            s.scorer_seconds[name] = round(s.scorer_seconds.get(name, 0.0) + v, 3)
        for row in rows:
            if row["key"] in seen:  # the same key twice in the input: the first is kept
                continue
            seen.add(row["key"])
            run.write([row])
            s.failed += row["error"] is not None
            s.scored += row["error"] is None
    s.skipped = sum(shard.rows for shard in shards) - s.scored - s.failed


def _emit(pending, scorers: Scorers, run: Run) -> None:
    rows, loaded = pending
    scored = score_batch(rows, scorers, loaded())
    run.write(scored)
    failed = sum(row["error"] is not None for row in scored)
    run.summary.failed += failed
    run.summary.scored += len(scored) - failed
