"""The retry swap: rows of a shard directory replaced by copy-on-write of whole shards, so every
key stays in exactly one complete shard (the caption job's `--retry-failed` uses it).

Each complete shard holding replaced keys is rewritten as a NEW shard (same rows, the replaced
ones swapped in) and the old shard is deleted, one shard at a time, in this order:
  1. `retry-journal.json` = {new shard name: [old shard]} (atomic write);
  2. the new shard via ShardWriter (temp -> rename -> `.done`);
  3. the old shard's `.done`, then the old shard; then the journal.
A crash before 2 completes leaves the old shard (the rerun's clean_incomplete drops the partial
new one, and the job simply redoes its replacements); a crash after 2 leaves both, and the next
run first finishes the swap from the journal (finish_interrupted_retry). Only in that crash
window, or for the instant between steps 2 and 3 of a live run, can a reader see a key twice; at
rest every key is in exactly one complete shard. Rows are never edited in place.

`out_dir` may be a local path or an object-store / fsspec URI: every file operation goes through
shards.fs, and the commit points (done-markers, the journal) are single whole-object writes there.
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
from shards.writer import ShardWriter


def finish_interrupted_retry(out_dir: str | Path) -> None:
    """Complete (or abandon) a retry swap a crash interrupted."""
    journal = fs.join(out_dir, JOURNAL)
    if not fs.exists(journal):
        return
    plan = json.loads(fs.read_text(journal))
    for new, olds in plan.items():
        if fs.exists(done_marker(fs.join(out_dir, new))):  # the replacement is complete: drop what it replaces
            for old in olds:
                fs.delete(done_marker(fs.join(out_dir, old)))  # the marker first: the old shard stops counting
                fs.delete(fs.join(out_dir, old))
    fs.delete(journal)


def failed_keys(out_dir: str | Path) -> set[str]:
    """Keys whose row in the complete shards carries an error."""
    return done_keys(out_dir) - done_keys(out_dir, where_ok=True)


def replace_rows(out_dir: str | Path, writer: ShardWriter, replacements: dict[str, dict | None]) -> None:
    """Rewrite every complete caption shard holding a key of `replacements`, with the new rows in
    place (a key mapped to None loses its row), one journalled swap at a time."""
    if not replacements:
        return
    keys = pa.array(list(replacements), pa.string())
    for shard in complete_shards(out_dir):
        table = fs.read_table(shard, schema=CAPTION_SCHEMA)
        if not pc.any(pc.is_in(table.column("key"), value_set=keys)).as_py():
            continue
        rows = [replacements[r["key"]] if r["key"] in replacements else r for r in table.to_pylist()]
        rows = [r for r in rows if r is not None]
        if not rows:  # every row of the shard is gone: the marker first, so it stops counting
            fs.delete(done_marker(shard))
            fs.delete(shard)
            continue
        name = writer.next_shard_name()
        # the journal exists (written whole: temp + rename, or one PUT) before the replacement does
        fs.write_text(fs.join(out_dir, JOURNAL), json.dumps({name: [fs.basename(shard)]}))
        path = writer.write_table(rows_to_table(rows))
        assert fs.basename(path) == name
        finish_interrupted_retry(out_dir)
