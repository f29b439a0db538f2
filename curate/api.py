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
from shards.reader import Shard, complete_shards, iter_batches, open_shards, read_manifest
from shards.writer import ROWS_PER_SHARD, ShardWriter, delete_shard, write_manifest
from shards.models import DEFAULT_CLIP
from curate.scorers import NEEDS_CLIP, Scorers, decode_ahead, decode_row, parse_scorers, score_batch, score_schema

DEDUP_DIR = "dedup"  # scores/dedup/: the whole-dataset duplicate pass, rebuilt after new rows
INPUT_COLUMNS = ("key", "address", "source", "member", "caption", "alt_text", "image")


SCORE_RANGES = {"dedup_threshold": Range(0, 1, lo_open=True), "batch_size": Range(1, 65536),
                "shard_size": Range(1, 10_000_000), "decode_short": Range(16, 8192), "workers": WORKERS,
                "replicas": Range(1, 4096)}  # dedup_threshold: a CLIP image cosine


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
    batch_size: int = 32
    shard_size: int = ROWS_PER_SHARD
    decode_short: int = 448
    workers: int = 2
    progress: bool = True
    engine: str = "local"  # or "ray": the same per-batch function in Ray Data tasks
    ray_address: str | None = None
    replicas: int = 1  # --engine ray: concurrent scoring tasks (each loads the models once)

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
        return names

    def recorded(self, names: list[str]) -> dict[str, Any]:
        """What the run record and the manifest hold of this run (`names`: the parsed scorers)."""
        rec = {"shards": str(self.shards), "scorers": names, "clip_model": self.clip_model, "aesthetic_weights": self.aesthetic_weights,
               "fit_aesthetic": str(self.fit_aesthetic or ""), "dedup_threshold": self.dedup_threshold,
               "decode_short": self.decode_short, "batch_size": self.batch_size, "shard_size": self.shard_size}  # fmt: skip
        return {**rec, "engine": "ray"} if self.engine == "ray" else rec


def score_command(cfg: ScoreConfig) -> str:
    """`t2i-data score`: the run, then what it prints (its summary and the shards in `out`)."""
    return run_score(cfg).shards_line(cfg.out)


def score_line(s: Mapping[str, Any]) -> str:
    """The score summary's line: scored, unreadable, skipped (already done), rate, duplicates."""
    rate = (s["scored"] + s["failed"]) / s["seconds"] if s.get("seconds") else 0.0
    line = f"scored {s['scored']}, unreadable {s['failed']}, skipped as already done {s['skipped']} ({rate:.2f} images/s)"
    return line + (f"; {s['duplicates']} near-duplicates" if s.get("duplicates") is not None else "")


def _input_batches(shards: list[Shard], batch_size: int) -> Iterator[list[dict]]:
    for batch in iter_batches(shards, INPUT_COLUMNS, batch_size):
        yield batch.to_pylist()


def run_score(cfg: ScoreConfig) -> Summary:
    """Score every caption row of `cfg.shards` not yet in `cfg.out`; rerunning resumes."""
    names = cfg.validate()
    spec = JobSpec("score", cfg.out, settings=cfg.recorded(names), identity=ScoreConfig.IDENTITY, schema=score_schema(names),
                   rows_per_shard=cfg.shard_size, summary=dict(scored=0, failed=0, skipped=0, duplicates=None), describe=score_line)
    with job_run(spec) as run:  # one writer per scores directory, taken before any clean-up
        shards = open_shards(cfg.shards, "caption")  # no caption shards: say so before any model loads
        head = _fit_head(cfg, shards) if cfg.fit_aesthetic else None
        if cfg.engine == "ray":
            _score_rows_ray(cfg, run, names, shards)
        else:
            scorers = Scorers.load(names, cfg.clip_model, cfg.aesthetic_weights, aesthetic_head=head,
                                   decode_short=cfg.decode_short, workers=cfg.workers)  # fmt: skip
            _score_rows(cfg, run, scorers, shards)
        s = run.summary
        if "dedup" in names:
            run.writer.flush()
            s.duplicates = _dedup_pass(run.out, cfg.dedup_threshold, fresh=s.scored + s.failed > 0)
        return run.finish(extra={"schema": "scores"}, images=s.scored + s.failed)


def _score_rows(cfg: ScoreConfig, run: Run, scorers: Scorers, shards: list[Shard]) -> None:
    """The local engine: decode the next batch in threads while this one is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen: set[str] = set()

    def todo() -> Iterator[list[dict]]:
        for rows in _input_batches(shards, cfg.batch_size):
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

    import_ray()
    weights = str(fs.join(run.out, "aesthetic-head.safetensors")) if cfg.fit_aesthetic else cfg.aesthetic_weights
    if "aesthetic" in names and not weights:
        raise UserError("the aesthetic scorer needs --aesthetic-weights FILE_OR_HF_ID or --fit-aesthetic ratings.parquet")
    s, seen = run.summary, set(run.done)
    spec = (tuple(names), cfg.clip_model, weights, cfg.decode_short)
    columns = [c for c in INPUT_COLUMNS if all(c in shard.columns for shard in shards)]
    paths = [str(shard.location) for shard in shards]
    for rows in score_with_ray(paths, columns, spec, run.done, cfg.batch_size, cfg.replicas, cfg.ray_address):
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


def _dedup_pass(out: fs.Location, threshold: float, fresh: bool) -> int:
    """(Re)build scores/dedup/ when rows were added or it is missing; its manifest is written
    last, so a directory without one is a crashed pass and is rebuilt."""
    import pyarrow.compute as pc

    from curate.dedup import DEDUP_SCHEMA, find_duplicates

    dedup_dir = fs.join(out, DEDUP_DIR)
    if fresh or not read_manifest(dedup_dir):
        if fs.exists(fs.join(dedup_dir, "manifest.json")):
            fs.delete(fs.join(dedup_dir, "manifest.json"))
        for shard in complete_shards(dedup_dir) if fs.exists(dedup_dir) else []:
            delete_shard(shard)
        writer = ShardWriter(dedup_dir, schema=DEDUP_SCHEMA, prefix="dedup")
        for table in find_duplicates(out, threshold):  # a shard per 250k rows
            writer.write_table(table)
        write_manifest(dedup_dir, config={"threshold": threshold}, extra={"schema": "dedup"})
    return sum(pc.sum(b.column(0)).as_py() or 0 for b in iter_batches(complete_shards(dedup_dir), ["near_duplicate"]))


def _fit_head(cfg: ScoreConfig, shards: list[Shard]):
    """Fit the aesthetic head on `cfg.fit_aesthetic` (a Parquet file with `key` and `rating`,
    keys of rows in the caption `shards`) and save it as OUT/aesthetic-head.safetensors."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.models.aesthetic import fit_head, save_head
    from shards.models.clip import ClipEmbedder

    path = Path(cfg.fit_aesthetic)
    if not path.is_file():
        raise UserError(f"--fit-aesthetic {path} not found: pass a Parquet file with columns key and rating")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"--fit-aesthetic {path} is not a readable Parquet file ({str(e).splitlines()[0]}): pass a Parquet "
                        "file with columns key and rating") from None
    if not {"key", "rating"} <= set(table.schema.names):
        raise UserError(f"--fit-aesthetic {path} has columns {', '.join(table.schema.names)}: it needs key and rating")
    if not pa.types.is_integer(table.schema.field("rating").type) and not pa.types.is_floating(table.schema.field("rating").type):
        raise UserError(f"--fit-aesthetic {path}: its rating column holds {table.schema.field('rating').type}: write ratings as numbers")
    wanted = {k: v for k, v in zip(table.column("key").to_pylist(), table.column("rating").to_pylist()) if v is not None}
    clip = ClipEmbedder(cfg.clip_model)
    probe = Scorers(["image"], decode_short=cfg.decode_short)
    embs, ratings = [], []
    for rows in _input_batches(shards, cfg.batch_size):
        rated = [r for r in rows if r["key"] in wanted]
        loaded = [(r, decode_row(r, probe)) for r in rated]
        ok = [(r, l) for r, l in loaded if not isinstance(l, str)]
        if ok:
            embs.append(clip.embed_images([l.image for _, l in ok]))
            ratings.extend(float(wanted[r["key"]]) for r, _ in ok)
    if len(ratings) < 2:
        raise UserError(f"--fit-aesthetic {path}: only {len(ratings)} of its keys are readable rows of {cfg.shards}: rate images of these shards")
    head = fit_head(np.concatenate(embs), np.asarray(ratings))
    save_head(head, fs.join(fs.as_location(cfg.out), "aesthetic-head.safetensors"))
    return head
