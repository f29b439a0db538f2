"""`t2i-data select`: caption rows whose scores pass a condition, written as caption shards.

The condition is a polars SQL expression over the score columns (scores/, plus scores/dedup/ and
scores/phash/ when those scorers ran) and the caption columns, e.g.
`aesthetic >= 5.5 and nsfw < 0.2 and not near_duplicate and lang = 'en'`. Its top-level `and`
terms are counted one after the other, so the summary says how many rows each one removed. A row
where a term is null (no score: an unreadable image) fails it.

`--top COLUMN:P%` (with `--by GROUP`: per group) then keeps exactly ceil(P% of N) of the N rows
that pass `--where` (curate.rank: ties by key hash, streamed in a few passes over the score
shards, never all rows in memory); `--where` is optional with `--top`.

Only keys and the conditions' booleans are collected; the caption rows themselves are streamed
batch by batch into the job skeleton's run (shards.job: lock, settings checked and recorded,
clean-up, done keys, writer, ledger, manifest), so `kill -9` then a rerun resumes with no
duplicate rows, and a rerun with another --where, --shards or --scores is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.checks import Range, check_output_dir
from shards.errors import UserError
from shards.job import JobSpec, Run, Summary, job_run
from shards.reader import Shard, ShardError, complete_shards, iter_batches, open_shards, read_manifest
from shards.schema import CAPTION_SCHEMA
from shards.writer import ROWS_PER_SHARD
from curate.passes import PASSES

if TYPE_CHECKING:
    import polars as pl

EMBEDDINGS = ("clip_image_emb", "clip_text_emb")  # never needed by a condition: not loaded
IDENTITY = ("shards", "scores", "where", "top", "by")  # what a resume must keep; --shard-size may change


@dataclass
class SelectConfig:
    """Every setting of a select run (CLI flags map 1:1): the caption shards, their scores, the
    condition, the new caption shard directory and its rows per shard."""

    shards: str | Path
    scores: str | Path
    where: str | None = None  # optional with --top
    out: str | Path = "selected"
    shard_size: int = ROWS_PER_SHARD
    top: str | None = None  # COLUMN:P%: keep the best P% (after --where) by that score
    by: str | None = None  # with --top: the quota applies per value of this score column

    def validate(self) -> None:
        """A one-line UserError for a shard size out of range, an empty condition (without --top),
        a bad --top, --by without --top or an output that cannot be written (before the shards are read)."""
        Range(1, 10_000_000).check("shard_size", self.shard_size)
        _check_terms(self.where, self.top, self.by)
        if self.top:
            from curate.rank import parse_top

            parse_top(self.top)  # a bad share or form: one line before any shard is read
        check_output_dir(self.out)


def select_command(cfg: SelectConfig) -> str:
    """`t2i-data select`: the run, then what it prints (select_line)."""
    cfg.validate()
    return run_select(cfg.shards, cfg.scores, cfg.where, cfg.out, shard_size=cfg.shard_size, top=cfg.top, by=cfg.by).line()


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
    """Scores (minus embeddings), left-joined with the passes' columns (dedup, phash), and the
    caption columns the scores lack, one row per caption row."""
    import polars as pl

    fix = f"run `t2i-data score --shards {shards_dir} --out {scores}` first"
    lf = _scan(open_shards(scores, "score", fix))
    lf = lf.select([c for c in lf.collect_schema().names() if c not in EMBEDDINGS])
    for name in PASSES:  # dedup/, phash/: the whole-dataset passes, when complete
        done = _pass_shards(scores, name)
        if done:
            lf = lf.join(_scan(done), on="key", how="left")
    captions = _scan(shards)
    have = set(lf.collect_schema().names())
    captions = captions.select(["key"] + [c for c in captions.collect_schema().names() if c not in have and c != "image"])
    return captions.join(lf, on="key", how="left")


def _exprs(conditions: list[str]) -> list[pl.Expr]:
    """One boolean expression per condition, named c0, c1, ... (null counts as failed)."""
    import polars as pl

    return [pl.sql_expr(c).cast(pl.Boolean).fill_null(False).alias(f"c{i}") for i, c in enumerate(conditions)]


def _bad_where(e: Exception, where: str, columns: list[str]) -> UserError:
    """A polars parse/column/type error as one line naming the columns."""
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = re.sub(r";\s*valid columns:.*", "", reason)  # the columns follow, once
    return UserError(f"bad --where {where!r} ({reason}): use SQL over the columns {', '.join(columns)}")


def _pass_shards(scores: str | Path, name: str) -> list[Shard]:
    """The shards of scores/<name>/ (dedup, phash) when that pass finished (its manifest), else none."""
    pass_dir = fs.join(fs.as_location(scores), name)
    return open_shards(pass_dir, name) if fs.exists(pass_dir) and read_manifest(pass_dir) and complete_shards(pass_dir) else []


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
        flags = lf.select([pl.col("key"), *_exprs(conditions)])
        flags.collect_schema()
        return flags.collect(engine="streaming")
    except (OSError, pa.ArrowException):
        raise  # the data, not the condition: run_select names the shard
    except Exception as e:  # noqa: BLE001 - polars parse/column/type errors: one line naming the columns
        raise _bad_where(e, where, columns) from None


def run_select(shards: str | Path, scores: str | Path, where: str | None, out: str | Path,
               shard_size: int = SelectConfig.shard_size, top: str | None = None, by: str | None = None) -> Summary:
    """Write the caption rows of `shards` whose scores satisfy `where` (and, with `top`, rank
    among the best P%, per `by` group) to `out` (resumable)."""
    conditions = _check_terms(where, top, by)
    caption_shards = open_shards(shards, "caption")
    if top:
        total, kept, removed, hit = _ranked(caption_shards, shards, scores, conditions, where or "", top, by)
    else:
        total, removed, keep = _filtered(caption_shards, shards, scores, conditions, where or "")
        kept, hit = len(keep), lambda keys: pc.is_in(keys, value_set=keep)
    settings = {"shards": str(shards), "scores": str(scores), "where": where, "shard_size": shard_size,
                "top": top, "by": by}  # fmt: skip
    spec = JobSpec("select", out, settings=settings, identity=IDENTITY, schema=_output_schema(caption_shards), rows_per_shard=shard_size,
                   device="cpu", summary=dict(total=total, kept=kept, written=0, removed=removed), describe=select_line)
    with job_run(spec) as run:  # one writer per selection directory, taken before any clean-up
        _write_rows(run, caption_shards, hit)
        return run.finish(extra={"selected": kept}, rows=run.summary.written)


def _check_terms(where: str | None, top: str | None, by: str | None) -> list[str]:
    """The --where terms; a one-line error when there are none and no --top, or --by lacks --top."""
    conditions = split_conditions(where or "")
    if not conditions and not top:
        raise UserError("empty --where: pass a condition such as \"aesthetic >= 5.5 and not near_duplicate\" "
                        "(or --top clip_score:30%)")
    if by and not top:
        raise UserError("--by needs --top: pass e.g. --top clip_score:30% --by lang")
    return conditions


def _filtered(caption_shards: list[Shard], shards, scores, conditions: list[str], where: str):
    """--where: (rows, rows removed by each condition, the keys of the rows that pass them all)."""
    import polars as pl

    try:
        flags = _condition_flags(_frame(caption_shards, shards, scores), conditions, where)
    except (OSError, pa.ArrowException) as e:  # a page whose checksum fails, a truncated shard
        damaged = [s for name in PASSES for s in _pass_shards(scores, name)]
        raise _find_damaged(caption_shards + open_shards(scores, "score") + damaged, e) from None
    mask, removed = pl.Series([True] * flags.height), []
    for i, cond in enumerate(conditions):
        col = flags[f"c{i}"]
        removed.append((cond, int((mask & ~col).sum())))
        mask = mask & col
    return flags.height, removed, pa.array(flags.filter(mask)["key"].to_list(), pa.string())


def _ranked(caption_shards: list[Shard], shards, scores, conditions: list[str], where: str, top: str, by: str | None):
    """--top (after --where): (rows, kept, removed per step, which keys to write). A --where over
    score columns is evaluated batch by batch in the rank's own passes; one that needs caption
    columns is evaluated first, as without --top, and only its passing keys are kept."""
    import polars as pl

    from curate.rank import Ranker, ScoreSource, parse_top

    spec, source = parse_top(top), ScoreSource(scores)
    needed = sorted({c for cond in conditions for c in _roots(cond, where, list(source.columns))})
    if set(needed) <= set(source.columns):
        columns = list(source.columns)
        exprs = _exprs(conditions)

        def flags(table: pa.Table) -> list[np.ndarray]:
            try:
                out = pl.from_arrow(table).select(exprs)
            except Exception as e:  # noqa: BLE001 - a type error shows on the first batch: one line
                raise _bad_where(e, where, columns) from None
            return [out[f"c{i}"].to_numpy() for i in range(len(conditions))]

        ranker = Ranker(source, spec, by, flags, needed, terms=conditions)
    else:
        _, removed, passing = _filtered(caption_shards, shards, scores, conditions, where)
        ranker = Ranker(source, spec, by, passing=passing, terms=[c for c, _ in removed])
        ranker.removed[: len(removed)] = removed
    result = ranker.run()
    return sum(s.rows for s in caption_shards), result.kept, result.removed, result.hit


def _roots(condition: str, where: str, columns: list[str]) -> list[str]:
    """The columns `condition` reads (a one-line error when it does not parse)."""
    import polars as pl

    try:
        return pl.sql_expr(condition).meta.root_names()
    except Exception as e:  # noqa: BLE001 - a parse error: one line
        raise _bad_where(e, where, columns) from None


def _write_rows(run: Run, shards: list[Shard], keep: Callable[[pa.ChunkedArray], Any]) -> None:
    """Stream the caption rows whose keys `keep` says to keep, and not yet in the output, into `run`."""
    done = pa.array(sorted(run.done), pa.string())
    schema = run.writer.schema
    for batch in iter_batches(shards, batch_size=1024):
        table = pa.Table.from_batches([batch])
        hit = pc.and_(pa.array(np.asarray(keep(table["key"]), bool)), pc.invert(pc.is_in(table["key"], value_set=done)))
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
