"""`t2i-data select`: caption rows whose scores pass a condition, written as caption shards.

The condition is a polars SQL expression over the score columns (scores/, plus scores/dedup/
when the dedup scorer ran) and the caption columns, e.g.
`aesthetic >= 5.5 and nsfw < 0.2 and not near_duplicate and lang = 'en'`. Its top-level `and`
terms are counted one after the other, so the summary says how many rows each one removed. A row
where a term is null (no score: an unreadable image) fails it.

Only keys and the conditions' booleans are collected; the caption rows themselves are streamed
shard by shard into a ShardWriter, so `kill -9` then a rerun resumes with no duplicate rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.errors import UserError
from shards.lock import output_lock
from shards.reader import ShardError, clean_incomplete, complete_shards, done_keys, read_manifest
from shards.schema import CAPTION_SCHEMA
from shards.writer import ShardWriter

EMBEDDINGS = ("clip_image_emb", "clip_text_emb")  # never needed by a condition: not loaded


@dataclass
class SelectSummary:
    total: int = 0
    kept: int = 0
    written: int = 0  # rows written by this run (the rest were already there: resumed)
    removed: list[tuple[str, int]] = field(default_factory=list)  # (condition, rows it removed)

    def lines(self) -> list[str]:
        out = [f"{cond}: removed {n}" for cond, n in self.removed]
        return out + [f"kept {self.kept} of {self.total} rows ({self.written} written now)"]


def split_conditions(where: str) -> list[str]:
    """The top-level `and` terms of `where` (not inside parentheses or quotes)."""
    terms, depth, quote, start = [], 0, None, 0
    for m in re.finditer(r"""[()'"]|\band\b""", where, flags=re.I):
        tok = m.group(0)
        if quote:
            quote = None if tok == quote else quote
        elif tok in "'\"":
            quote = tok
        elif tok in "()":
            depth += 1 if tok == "(" else -1
        elif depth == 0:
            terms.append(where[start : m.start()])
            start = m.end()
    terms.append(where[start:])
    return [t.strip() for t in terms if t.strip()]


def _frame(shards: str | Path, scores: str | Path) -> pl.LazyFrame:
    """Scores (minus embeddings), left-joined with dedup flags, and the caption columns the
    scores lack, one row per caption row."""
    score_files = [str(p) for p in complete_shards(scores)]
    caption_files = [str(p) for p in complete_shards(shards)]
    if not caption_files:
        raise ShardError(f"no complete caption shards in {shards}: run `t2i-data caption --out {shards}` first")
    if not score_files:
        raise ShardError(f"no complete score shards in {scores}: run `t2i-data score --shards {shards} --out {scores}` first")
    lf = pl.scan_parquet(score_files)
    lf = lf.select([c for c in lf.collect_schema().names() if c not in EMBEDDINGS])
    dedup = fs.join(fs.as_location(scores), "dedup")
    if fs.exists(dedup) and read_manifest(dedup):
        lf = lf.join(pl.scan_parquet([str(p) for p in complete_shards(dedup)]), on="key", how="left")
    captions = pl.scan_parquet(caption_files)
    have = set(lf.collect_schema().names())
    captions = captions.select(["key"] + [c for c in captions.collect_schema().names() if c not in have and c != "image"])
    return captions.join(lf, on="key", how="left")


def _condition_flags(lf: pl.LazyFrame, conditions: list[str], where: str) -> pl.DataFrame:
    """key + one boolean column per condition (null counts as failed)."""
    columns = lf.collect_schema().names()
    try:
        exprs = [pl.sql_expr(c).cast(pl.Boolean).fill_null(False).alias(f"c{i}") for i, c in enumerate(conditions)]
        flags = lf.select([pl.col("key"), *exprs])
        flags.collect_schema()
        return flags.collect(engine="streaming")
    except Exception as e:  # noqa: BLE001 - polars parse/column/type errors: one line naming the columns
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r";\s*valid columns:.*", "", reason)  # the columns follow, once
        raise UserError(f"bad --where {where!r} ({reason}): use SQL over the columns {', '.join(columns)}") from None


def run_select(shards: str | Path, scores: str | Path, where: str, out: str | Path, shard_size: int = 1000) -> SelectSummary:
    """Write the caption rows of `shards` whose scores satisfy `where` to `out` (resumable)."""
    conditions = split_conditions(where)
    if not conditions:
        raise UserError("empty --where: pass a condition such as \"aesthetic >= 5.5 and not near_duplicate\"")
    flags = _condition_flags(_frame(shards, scores), conditions, where)
    summary = SelectSummary(total=flags.height)
    mask = pl.Series([True] * flags.height)
    for i, cond in enumerate(conditions):
        col = flags[f"c{i}"]
        summary.removed.append((cond, int((mask & ~col).sum())))
        mask = mask & col
    keep = pa.array(flags.filter(mask)["key"].to_list(), pa.string())
    summary.kept = len(keep)
    summary.written = _write_rows(shards, out, keep, {"shards": str(shards), "scores": str(scores), "where": where}, shard_size)
    return summary


def _write_rows(shards: str | Path, out: str | Path, keep: pa.Array, config: dict, shard_size: int) -> int:
    out = fs.as_location(out)
    with output_lock(out, "select"):  # one writer per selection directory, taken before any clean-up
        return _write_rows_locked(shards, out, keep, config, shard_size)


def _write_rows_locked(shards: str | Path, out: fs.Location, keep: pa.Array, config: dict, shard_size: int) -> int:
    before = read_manifest(out).get("config", {}).get("where")
    if complete_shards(out) and before is not None and before != config["where"]:
        raise UserError(f"{out} holds a selection by {before!r}: pass the same --where to resume, or a new --out")
    clean_incomplete(out)
    done = pa.array(sorted(done_keys(out)), pa.string())
    schema = _output_schema(shards)
    writer = ShardWriter(out, rows_per_shard=shard_size, config=config, schema=schema)
    written = 0
    for shard in complete_shards(shards):
        for rb in fs.parquet_file(shard).iter_batches(batch_size=1024):
            table = pa.Table.from_batches([rb])
            hit = pc.and_(pc.is_in(table["key"], value_set=keep), pc.invert(pc.is_in(table["key"], value_set=done)))
            rows = _conform(table.filter(hit), schema).to_pylist()
            writer.add_many(rows)
            written += len(rows)
    writer.close(extra={"selected": len(keep)})
    return written


def _output_schema(shards: str | Path) -> pa.Schema:
    """The caption schema plus every extra column of the input shards (a class-cond stage's
    labels, further captions), so a selection loses nothing its source had."""
    extra: dict[str, pa.Field] = {}
    for shard in complete_shards(shards):
        for field in fs.parquet_file(shard).schema_arrow:
            if field.name not in CAPTION_SCHEMA.names:
                extra.setdefault(field.name, field)
    return pa.schema([*CAPTION_SCHEMA, *extra.values()])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: its columns in that order, a column it lacks (an older shard) as nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)
