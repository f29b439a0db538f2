"""`t2i-data select`: caption rows whose scores pass a condition, written as caption shards.

The condition is a polars SQL expression over the score columns (scores/, plus scores/dedup/
when the dedup scorer ran) and the caption columns, e.g.
`aesthetic >= 5.5 and nsfw < 0.2 and not near_duplicate and lang = 'en'`. Its top-level `and`
terms are counted one after the other, so the summary says how many rows each one removed. A row
where a term is null (no score: an unreadable image) fails it.

Only keys and the conditions' booleans are collected; the caption rows themselves are streamed
batch by batch into the job skeleton's run (shards.job: lock, settings checked and recorded,
clean-up, done keys, writer, ledger, manifest), so `kill -9` then a rerun resumes with no
duplicate rows, and a rerun with another --where, --shards or --scores is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.checks import Range, check_output_dir
from shards.errors import UserError
from shards.job import JobSpec, Run, Summary, job_run
from shards.reader import Shard, ShardError, complete_shards, iter_batches, open_shards, read_manifest
from shards.schema import CAPTION_SCHEMA
from shards.writer import ROWS_PER_SHARD

if TYPE_CHECKING:
    import polars as pl

EMBEDDINGS = ("clip_image_emb", "clip_text_emb")  # never needed by a condition: not loaded
IDENTITY = ("shards", "scores", "where")  # what a resume must keep; --shard-size may change


@dataclass
class SelectConfig:
    """Every setting of a select run (CLI flags map 1:1): the caption shards, their scores, the
    condition, the new caption shard directory and its rows per shard."""

    shards: str | Path
    scores: str | Path
    where: str
    out: str | Path
    shard_size: int = ROWS_PER_SHARD

    def validate(self) -> None:
        """A one-line UserError for a shard size out of range, an empty condition or an output
        that cannot be written (before the shards are read)."""
        Range(1, 10_000_000).check("shard_size", self.shard_size)
        if not split_conditions(self.where):
            raise UserError("empty --where: pass a condition such as \"aesthetic >= 5.5 and not near_duplicate\"")
        check_output_dir(self.out)


def select_command(cfg: SelectConfig) -> str:
    """`t2i-data select`: the run, then what it prints (select_line)."""
    cfg.validate()
    return run_select(cfg.shards, cfg.scores, cfg.where, cfg.out, shard_size=cfg.shard_size).line()


def select_line(s: Mapping[str, Any]) -> str:
    """What select reports: one line per condition (the rows it removed), then the rows kept
    (`written`: by this run; the rest were already there)."""
    out = [f"{cond}: removed {n}" for cond, n in s["removed"]]
    return "\n".join(out + [f"kept {s['kept']} of {s['total']} rows ({s['written']} written now)"])


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


def _frame(shards: list[Shard], shards_dir: str | Path, scores: str | Path) -> pl.LazyFrame:
    """Scores (minus embeddings), left-joined with dedup flags, and the caption columns the
    scores lack, one row per caption row."""
    import polars as pl

    fix = f"run `t2i-data score --shards {shards_dir} --out {scores}` first"
    lf = _scan(open_shards(scores, "score", fix))
    lf = lf.select([c for c in lf.collect_schema().names() if c not in EMBEDDINGS])
    dedup = _dedup_shards(scores)
    if dedup:
        lf = lf.join(_scan(dedup), on="key", how="left")
    captions = _scan(shards)
    have = set(lf.collect_schema().names())
    captions = captions.select(["key"] + [c for c in captions.collect_schema().names() if c not in have and c != "image"])
    return captions.join(lf, on="key", how="left")


def _dedup_shards(scores: str | Path) -> list[Shard]:
    """The shards of scores/dedup/ when the dedup pass finished (its manifest), else none."""
    dedup = fs.join(fs.as_location(scores), "dedup")
    return open_shards(dedup, "dedup") if fs.exists(dedup) and read_manifest(dedup) and complete_shards(dedup) else []


def _scan(shards: list[Shard]) -> pl.LazyFrame:
    """The shards as one lazy frame, read through pyarrow so that every page's checksum is
    verified (polars' own Parquet reader skips them)."""
    import polars as pl

    return pl.scan_pyarrow_dataset(fs.parquet_dataset([s.location for s in shards]))


def _find_damaged(shards: list[Shard], e: BaseException) -> ShardError:
    """The shard a failed scan tripped on (read again one by one, each read verified), named."""
    for shard in shards:
        for _ in iter_batches([shard]):  # raises the one-line error naming a damaged shard
            pass
    return ShardError(f"reading the shards failed ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                      "rerun the job that wrote them")


def _condition_flags(lf: pl.LazyFrame, conditions: list[str], where: str) -> pl.DataFrame:
    """key + one boolean column per condition (null counts as failed)."""
    import polars as pl

    columns = lf.collect_schema().names()
    try:
        exprs = [pl.sql_expr(c).cast(pl.Boolean).fill_null(False).alias(f"c{i}") for i, c in enumerate(conditions)]
        flags = lf.select([pl.col("key"), *exprs])
        flags.collect_schema()
        return flags.collect(engine="streaming")
    except (OSError, pa.ArrowException):
        raise  # the data, not the condition: run_select names the shard
    except Exception as e:  # noqa: BLE001 - polars parse/column/type errors: one line naming the columns
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r";\s*valid columns:.*", "", reason)  # the columns follow, once
        raise UserError(f"bad --where {where!r} ({reason}): use SQL over the columns {', '.join(columns)}") from None


def run_select(shards: str | Path, scores: str | Path, where: str, out: str | Path,
               shard_size: int = SelectConfig.shard_size) -> Summary:
    """Write the caption rows of `shards` whose scores satisfy `where` to `out` (resumable)."""
    import polars as pl

    conditions = split_conditions(where)
    if not conditions:
        raise UserError("empty --where: pass a condition such as \"aesthetic >= 5.5 and not near_duplicate\"")
    caption_shards = open_shards(shards, "caption")
    try:
        flags = _condition_flags(_frame(caption_shards, shards, scores), conditions, where)
    except (OSError, pa.ArrowException) as e:  # a page whose checksum fails, a truncated shard
        raise _find_damaged(caption_shards + open_shards(scores, "score") + _dedup_shards(scores), e) from None
    mask, removed = pl.Series([True] * flags.height), []
    for i, cond in enumerate(conditions):
        col = flags[f"c{i}"]
        removed.append((cond, int((mask & ~col).sum())))
        mask = mask & col
    keep = pa.array(flags.filter(mask)["key"].to_list(), pa.string())
    settings = {"shards": str(shards), "scores": str(scores), "where": where, "shard_size": shard_size}
    spec = JobSpec("select", out, settings=settings, identity=IDENTITY, schema=_output_schema(caption_shards), rows_per_shard=shard_size,
                   device="cpu", summary=dict(total=flags.height, kept=len(keep), written=0, removed=removed), describe=select_line)
    with job_run(spec) as run:  # one writer per selection directory, taken before any clean-up
        _write_rows(run, caption_shards, keep)
        return run.finish(extra={"selected": len(keep)}, rows=run.summary.written)


def _write_rows(run: Run, shards: list[Shard], keep: pa.Array) -> None:
    """Stream the caption rows whose keys are in `keep` and not yet in the output into `run`."""
    done = pa.array(sorted(run.done), pa.string())
    schema = run.writer.schema
    for batch in iter_batches(shards, batch_size=1024):
        table = pa.Table.from_batches([batch])
        hit = pc.and_(pc.is_in(table["key"], value_set=keep), pc.invert(pc.is_in(table["key"], value_set=done)))
        rows = _conform(table.filter(hit), schema).to_pylist()
        run.write(rows)
        run.summary.written += len(rows)


def _output_schema(shards: list[Shard]) -> pa.Schema:
    """The caption schema plus every extra column of the input shards (a class-cond stage's
    labels, further captions), so a selection loses nothing its source had."""
    extra: dict[str, pa.Field] = {}
    for shard in shards:
        for field in shard.schema:
            if field.name not in CAPTION_SCHEMA.names:
                extra.setdefault(field.name, field)
    return pa.schema([*CAPTION_SCHEMA, *extra.values()])


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` in `schema`: its columns in that order, a column it lacks (an older shard) as nulls."""
    for field in schema:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)
