"""`run_score` and `run_select`: the score and select jobs as functions (cli.py calls them).

    run_score(ScoreConfig(shards="out", out="scores", scorers="clip,aesthetic,dedup")) -> ScoreSummary
    run_select("out", "scores", "aesthetic >= 5.5 and not near_duplicate", "captions/aesthetic") -> SelectSummary
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from shards import fs
from shards.errors import UserError
from shards.lock import output_lock
from shards.reader import ShardError, clean_incomplete, complete_shards, done_keys, read_manifest
from shards.writer import ShardWriter, write_manifest
from curate.scorers import Scorers, decode_ahead, decode_row, parse_scorers, score_batch

DEDUP_DIR = "dedup"  # scores/dedup/: the whole-dataset duplicate pass, rebuilt after new rows
INPUT_COLUMNS = ("key", "address", "source", "member", "caption", "alt_text", "image")


@dataclass
class ScoreConfig:
    """Every setting of a score run (CLI flags map 1:1)."""

    shards: str | Path = "out"
    out: str | Path = "scores"
    scorers: str | list[str] = "clip,aesthetic,dedup,nsfw,lang,image"
    clip_model: str = "openai/clip-vit-large-patch14"
    aesthetic_weights: str | None = None  # file or HF id of a LAION v2 head
    fit_aesthetic: str | Path | None = None  # ratings.parquet (key, rating): fit a head first
    dedup_threshold: float = 0.95
    batch_size: int = 32
    shard_size: int = 1000
    decode_short: int = 448
    workers: int = 2
    progress: bool = True
    engine: str = "local"  # or "ray": the same per-batch function in Ray Data tasks
    ray_address: str | None = None
    replicas: int = 1  # --engine ray: concurrent scoring tasks (each loads the models once)


@dataclass
class ScoreSummary:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    duplicates: int | None = None  # rows marked near_duplicate (exact copies included)
    shards: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = (self.scored + self.failed) / self.seconds if self.seconds else 0.0
        s = f"scored {self.scored}, unreadable {self.failed}, skipped as already done {self.skipped} ({rate:.2f} images/s)"
        return s + (f"; {self.duplicates} near-duplicates" if self.duplicates is not None else "")


def _input_columns(shards: str | Path) -> list[str]:
    if not complete_shards(shards):
        raise ShardError(f"no complete caption shards in {shards}: run `t2i-data caption --out {shards}` first")
    names = set(fs.read_schema(complete_shards(shards)[0]).names)
    return [c for c in INPUT_COLUMNS if c in names]


def _input_batches(shards: str | Path, batch_size: int) -> Iterator[list[dict]]:
    columns = _input_columns(shards)
    for shard in complete_shards(shards):
        for rb in fs.parquet_file(shard).iter_batches(batch_size=batch_size, columns=columns):
            yield rb.to_pylist()


def _check_same_scorers(out: fs.Location, names: list[str]) -> None:
    before = read_manifest(out).get("config", {}).get("scorers")
    if complete_shards(out) and before and before != names:
        raise UserError(f"{out} holds scores of {','.join(before)}: pass --scorers {','.join(before)} to resume, or a new --out")


def run_score(cfg: ScoreConfig) -> ScoreSummary:
    """Score every caption row of `cfg.shards` not yet in `cfg.out`; rerunning resumes."""
    names = parse_scorers(cfg.scorers)
    out = fs.as_location(cfg.out)
    if cfg.batch_size < 1 or cfg.shard_size < 1 or cfg.replicas < 1:
        raise UserError("--batch-size, --shard-size and --replicas must be at least 1: pass positive numbers")
    if cfg.engine not in ("local", "ray"):
        raise UserError(f"unknown --engine {cfg.engine!r}: use local or ray")
    with output_lock(out, "score"):  # one writer per scores directory, taken before any clean-up
        return _score_locked(cfg, out, names)


def _score_locked(cfg: ScoreConfig, out: fs.Location, names: list[str]) -> ScoreSummary:
    """run_score, while this process holds `out`'s lock."""
    _check_same_scorers(out, names)
    clean_incomplete(out)
    _input_columns(cfg.shards)  # no caption shards: say so before any model loads
    head = _fit_head(cfg) if cfg.fit_aesthetic else None
    config = {"shards": str(cfg.shards), "scorers": names, "clip_model": cfg.clip_model,
              "aesthetic_weights": cfg.aesthetic_weights, "fit_aesthetic": str(cfg.fit_aesthetic or ""),
              "dedup_threshold": cfg.dedup_threshold}  # fmt: skip
    if cfg.engine == "ray":
        summary = _score_rows_ray(cfg, out, names, config)
    else:
        scorers = Scorers.load(names, cfg.clip_model, cfg.aesthetic_weights, aesthetic_head=head,
                               decode_short=cfg.decode_short, workers=cfg.workers)  # fmt: skip
        summary = _score_rows(cfg, out, scorers, config)
    if "dedup" in names:
        summary.duplicates = _dedup_pass(out, cfg.dedup_threshold, fresh=summary.scored + summary.failed > 0)
    manifest = write_manifest(out, config=config, extra={"schema": "scores", "last_run": {
        "scored": summary.scored, "failed": summary.failed, "skipped": summary.skipped}})  # fmt: skip
    summary.shards = [s["shard"] for s in manifest["shards"]]
    return summary


def _score_rows(cfg: ScoreConfig, out: fs.Location, scorers: Scorers, config: dict) -> ScoreSummary:
    """The local engine: decode the next batch in threads while this one is scored."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = done_keys(out)
    writer = ShardWriter(out, rows_per_shard=cfg.shard_size, schema=scorers.schema, config=config)
    summary, start, seen = ScoreSummary(), time.perf_counter(), set()

    def todo() -> Iterator[list[dict]]:
        for rows in _input_batches(cfg.shards, cfg.batch_size):
            fresh = [r for r in rows if r["key"] not in done and r["key"] not in seen]
            summary.skipped += len(rows) - len(fresh)
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
                _emit(pending, scorers, writer, summary)
                bar.advance(task, len(pending[0]))
            pending = ahead
        if pending is not None:
            _emit(pending, scorers, writer, summary)
    writer.flush()
    summary.seconds = time.perf_counter() - start
    return summary


def _score_rows_ray(cfg: ScoreConfig, out: fs.Location, names: list[str], config: dict) -> ScoreSummary:
    """The Ray engine: same per-batch function in Ray tasks, rows written here (one writer)."""
    from curate.engine_ray import score_with_ray
    from shards.ray_session import import_ray
    from curate.scorers import score_schema

    import_ray()
    weights = str(fs.join(out, "aesthetic-head.safetensors")) if cfg.fit_aesthetic else cfg.aesthetic_weights
    if "aesthetic" in names and not weights:
        raise UserError("the aesthetic scorer needs --aesthetic-weights FILE_OR_HF_ID or --fit-aesthetic ratings.parquet")
    done = done_keys(out)
    writer = ShardWriter(out, rows_per_shard=cfg.shard_size, schema=score_schema(names), config={**config, "engine": "ray"})
    summary, start, seen = ScoreSummary(), time.perf_counter(), set(done)
    total = sum(fs.parquet_file(s).metadata.num_rows for s in complete_shards(cfg.shards))
    spec = (tuple(names), cfg.clip_model, weights, cfg.decode_short)
    paths = [str(p) for p in complete_shards(cfg.shards)]
    for rows in score_with_ray(paths, _input_columns(cfg.shards), spec, done, cfg.batch_size, cfg.replicas, cfg.ray_address):
        for row in rows:
            if row["key"] in seen:  # the same key twice in the input: the first is kept
                continue
            seen.add(row["key"])
            writer.add(row)
            summary.failed += row["error"] is not None
            summary.scored += row["error"] is None
    writer.flush()
    summary.skipped = total - summary.scored - summary.failed
    summary.seconds = time.perf_counter() - start
    return summary


def _emit(pending, scorers: Scorers, writer: ShardWriter, summary: ScoreSummary) -> None:
    rows, loaded = pending
    for row in score_batch(rows, scorers, loaded()):
        writer.add(row)
        if row["error"] is None:
            summary.scored += 1
        else:
            summary.failed += 1


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
            fs.delete(fs.with_suffix_name(shard, ".done"))
            fs.delete(shard)
        writer = ShardWriter(dedup_dir, schema=DEDUP_SCHEMA, prefix="dedup")
        for table in find_duplicates(out, threshold):  # a shard per 250k rows
            writer.write_table(table)
        write_manifest(dedup_dir, config={"threshold": threshold}, extra={"schema": "dedup"})
    return sum(pc.sum(fs.read_table(s, columns=["near_duplicate"]).column(0)).as_py() or 0 for s in complete_shards(dedup_dir))


def _fit_head(cfg: ScoreConfig):
    """Fit the aesthetic head on `cfg.fit_aesthetic` (a Parquet file with `key` and `rating`,
    keys of rows in `cfg.shards`) and save it as OUT/aesthetic-head.safetensors."""
    import numpy as np
    import pyarrow.parquet as pq

    from shards.models.aesthetic import fit_head, save_head
    from shards.models.clip import ClipEmbedder

    path = Path(cfg.fit_aesthetic)
    if not path.is_file():
        raise UserError(f"--fit-aesthetic {path} not found: pass a Parquet file with columns key and rating")
    table = pq.read_table(path)
    if not {"key", "rating"} <= set(table.schema.names):
        raise UserError(f"--fit-aesthetic {path} has columns {', '.join(table.schema.names)}: it needs key and rating")
    wanted = dict(zip(table.column("key").to_pylist(), table.column("rating").to_pylist()))
    clip = ClipEmbedder(cfg.clip_model)
    probe = Scorers(["image"], decode_short=cfg.decode_short)
    embs, ratings = [], []
    for rows in _input_batches(cfg.shards, cfg.batch_size):
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
