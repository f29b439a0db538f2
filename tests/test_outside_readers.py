"""Readers outside the project (HF `datasets`, polars, pyarrow) given a shard directory's
`*.parquet` read exactly the committed rows: while a shard is being written, after a crash before
its commit, and after a crash inside the --retry-failed swap (issue 30, defect 10). The recipes
are the README's ("Reading shards with other tools")."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from shards import CaptionRow, ShardWriter, complete_shards, iter_batches
from shards import writer as shard_writer
from shards.layout import JOURNAL, done_marker
from shards.reader import clean_incomplete
from shards.retry import finish_interrupted_retry, replace_rows


class Killed(Exception):
    """Stands for kill -9 at that instant: nothing after it runs."""


def outside_reads(out: Path, tmp_path: Path) -> dict[str, list[tuple[str, str | None]]]:
    """(key, caption) of every row each reader returns, sorted; `ours` is the project's reader."""
    datasets = pytest.importorskip("datasets", reason="pip install -e '.[dev]' (datasets is in the dev extra)")
    pattern = str(out / "*.parquet")
    cache = tmp_path / f"hf-{len(list(tmp_path.glob('hf-*')))}"  # a fresh cache: files are rewritten in place
    hf = datasets.load_dataset("parquet", data_files=pattern, split="train", cache_dir=str(cache))
    reads = {
        "datasets": list(zip(hf["key"], hf["caption"])),
        "polars": pl.read_parquet(pattern).select("key", "caption").rows(),
        "pyarrow": pq.read_table(sorted(glob.glob(pattern)), columns=["key", "caption"]).to_pylist(),
        "ours": [r for b in iter_batches(out, ["key", "caption"]) for r in b.to_pylist()],
    }
    return {name: sorted((r["key"], r["caption"]) if isinstance(r, dict) else tuple(r) for r in rows) for name, rows in reads.items()}


def assert_every_reader_sees(out: Path, tmp_path: Path, expected: list[tuple[str, str | None]]) -> None:
    for name, rows in outside_reads(out, tmp_path).items():
        assert rows == sorted(expected), name


def rows(n: int, start: int = 0, caption: str = "a cat") -> list[CaptionRow]:
    return [CaptionRow(key=f"k{i}", caption=f"{caption} {i}") for i in range(start, start + n)]


def test_a_shard_being_written_is_invisible_until_committed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    w = ShardWriter(out, rows_per_shard=3)
    w.add_many(rows(3))  # one committed shard
    committed = [(f"k{i}", f"a cat {i}") for i in range(3)]
    real, seen = shard_writer._publish, []

    def look_then_publish(staged_as, final):  # the instant before the commit: staged file and marker written
        assert Path(staged_as).exists() and Path(str(done_marker(final))).exists()
        assert_every_reader_sees(out, tmp_path, committed)
        seen.append(final)
        real(staged_as, final)

    monkeypatch.setattr(shard_writer, "_publish", look_then_publish)
    w.add_many(rows(3, start=3))
    assert len(seen) == 1
    assert_every_reader_sees(out, tmp_path, committed + [(f"k{i}", f"a cat {i}") for i in range(3, 6)])


def test_a_crash_before_the_commit_leaves_only_committed_rows(tmp_path, monkeypatch):
    out = tmp_path / "out"
    w = ShardWriter(out, rows_per_shard=2)
    w.add_many(rows(2))

    def killed(staged_as, final):
        raise Killed

    monkeypatch.setattr(shard_writer, "_publish", killed)
    with pytest.raises(Killed):
        w.add_many(rows(2, start=2))
    names = {p.name for p in out.iterdir()}
    staged = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
    lone_markers = [n for n in names if n.endswith(".done") and n.removesuffix(".done") not in names]
    assert len(staged) == len(lone_markers) == 1  # the shard being committed: staged, its marker written
    assert_every_reader_sees(out, tmp_path, [("k0", "a cat 0"), ("k1", "a cat 1")])
    monkeypatch.undo()
    assert {Path(p).suffix for p in clean_incomplete(out)} == {".tmp", ".done"}  # the next run's clean-up
    assert_every_reader_sees(out, tmp_path, [("k0", "a cat 0"), ("k1", "a cat 1")])


def retry_world(out: Path) -> tuple[list[tuple[str, str | None]], dict[str, dict]]:
    """Two shards with a failed row each, and their replacements."""
    w = ShardWriter(out, rows_per_shard=3)
    w.add_many([CaptionRow(key=f"k{i}", caption=None if i in (1, 4) else f"a cat {i}", error="broken" if i in (1, 4) else None)
                for i in range(6)])  # fmt: skip
    w.close()
    before = [(f"k{i}", None if i in (1, 4) else f"a cat {i}") for i in range(6)]
    return before, {k: CaptionRow(key=k, caption=f"fixed {k}").__dict__ for k in ("k1", "k4")}


@pytest.mark.parametrize("when", ["before the replace", "after the replace"])
def test_a_crash_inside_the_retry_swap_never_shows_a_key_twice(tmp_path, monkeypatch, when):
    from shards import retry

    out = tmp_path / "out"
    before, fixes = retry_world(out)
    real = retry.commit_table

    def crash(shard, table):
        if when == "after the replace":
            real(shard, table)
        else:  # the marker already describes the new rows; the shard still holds the old ones
            shard_writer._write_marker(shard, table.num_rows, "0" * 64, 0)
        raise Killed

    monkeypatch.setattr(retry, "commit_table", crash)
    with pytest.raises(Killed):
        replace_rows(out, fixes)
    assert (out / JOURNAL).exists()
    swapped = [(k, "fixed k1" if k == "k1" else c) for k, c in before]  # the first shard's rewrite was published
    assert_every_reader_sees(out, tmp_path, swapped if when == "after the replace" else before)
    monkeypatch.undo()

    finish_interrupted_retry(out)  # what the next run does first
    assert not (out / JOURNAL).exists()
    for shard in complete_shards(out):  # every marker describes its shard as it is
        marker = json.loads(Path(str(done_marker(shard))).read_text())
        assert marker["sha256"] == shard_writer.sha256_file(shard) and marker["rows"] == pq.read_metadata(shard).num_rows
    replace_rows(out, fixes)  # the rerun redoes what was left
    assert_every_reader_sees(out, tmp_path, [(k, f"fixed {k}" if k in fixes else c) for k, c in before])
