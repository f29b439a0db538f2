"""The retry swap: rows of a shard directory replaced by rewriting, in place, each shard that
holds them, so every key stays in exactly one visible shard (the caption job's `--retry-failed`).

Each complete shard holding replaced keys is rewritten under its own name, one at a time:
  1. `retry-journal.json` = {"refresh": [the shard]} (atomic write);
  2. the new rows committed over the shard (shards.writer.commit_table: staged, its marker, then
     an atomic replace locally or one PUT on an object store);
  3. the journal deleted.
Readers, ours or any other, see the old rows or the new ones, never both, and never a key twice.
A crash between the marker and the replace leaves a marker that describes rows not published:
the next run first rewrites the marker of every journalled shard from the shard as it is
(finish_interrupted_retry); a crash before that redoes the replacements. A shard left without
rows is deleted (the shard, then its marker).

Journals of earlier versions, which wrote a NEW shard and then deleted the old one ({new shard:
[old shards]}), are finished as they were: once the new shard is complete, the old ones go.

`out_dir` may be a local path or an object-store / fsspec URI: every file operation goes through
shards.fs, and the commit points (the shard, the journal) are single whole-object writes there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.layout import JOURNAL, done_marker
from shards.reader import complete_shards, done_keys
from shards.schema import CAPTION_SCHEMA, rows_to_table
from shards.writer import commit_table, delete_shard, refresh_marker

REFRESH = "refresh"  # the journal's list of shards being rewritten in place


def finish_interrupted_retry(out_dir: str | Path) -> None:
    """Complete a retry swap a crash interrupted (see the module docstring)."""
    journal = fs.join(out_dir, JOURNAL)
    if not fs.exists(journal):
        return
    plan = json.loads(fs.read_text(journal))
    for name in plan.pop(REFRESH, []):
        refresh_marker(fs.join(out_dir, name))
    for new, olds in plan.items():  # an earlier version's swap: the replacement is complete, so what it replaces goes
        if fs.exists(done_marker(fs.join(out_dir, new))):
            for old in olds:
                delete_shard(fs.join(out_dir, old))
    fs.delete(journal)


def failed_keys(out_dir: str | Path) -> set[str]:
    """Keys whose row in the complete shards carries an error."""
    return done_keys(out_dir) - done_keys(out_dir, where_ok=True)


def replace_rows(out_dir: str | Path, replacements: dict[str, dict | None]) -> None:
    """Rewrite every complete caption shard holding a key of `replacements` in place, with the
    new rows where the old ones were (a key mapped to None loses its row), one journalled shard
    at a time."""
    if not replacements:
        return
    keys = pa.array(list(replacements), pa.string())
    for shard in complete_shards(out_dir):
        table = fs.read_table(shard, schema=CAPTION_SCHEMA)
        if not pc.any(pc.is_in(table.column("key"), value_set=keys)).as_py():
            continue
        rows = [replacements[r["key"]] if r["key"] in replacements else r for r in table.to_pylist()]
        rows = [r for r in rows if r is not None]
        if not rows:  # every row of the shard is gone
            delete_shard(shard)
            continue
        journal = fs.join(out_dir, JOURNAL)
        fs.write_text(journal, json.dumps({REFRESH: [fs.basename(shard)]}))  # whole: temp + rename, or one PUT
        commit_table(shard, rows_to_table(rows))
        fs.delete(journal)

