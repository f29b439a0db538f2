"""The shared shard layer: atomic writes, done-markers, manifest, resume bookkeeping."""

import json

import polars as pl
import pyarrow.parquet as pq
import pytest

from shards import CaptionRow, ShardError, ShardWriter, clean_incomplete, complete_shards, done_keys, iter_batches, read_manifest


def test_writer_rolls_shards_and_writes_manifest(tmp_path):
    w = ShardWriter(tmp_path, rows_per_shard=3, config={"model": "m"})
    for i in range(7):
        w.add(CaptionRow(key=f"k{i}", caption=f"a cat {i}", error=None if i != 4 else "bad"))
    manifest = w.close()
    shards = complete_shards(tmp_path)
    assert [pq.read_metadata(s).num_rows for s in shards] == [3, 3, 1]
    assert manifest["rows"] == 7 and len(manifest["shards"]) == 3
    assert read_manifest(tmp_path)["config"] == {"model": "m"}
    assert done_keys(tmp_path) == {f"k{i}" for i in range(7)}
    assert done_keys(tmp_path, where_ok=True) == {f"k{i}" for i in range(7)} - {"k4"}
    df = pl.read_parquet(str(tmp_path / "*.parquet"))
    assert df.height == 7 and df["caption"][0] == "a cat 0"


def test_shard_without_marker_is_invisible_and_cleaned(tmp_path):
    w = ShardWriter(tmp_path, rows_per_shard=2)
    w.add_many(CaptionRow(key=f"k{i}") for i in range(4))
    shards = complete_shards(tmp_path)
    # Simulate a crash between the rename and the done-marker.
    (shards[1].with_name(shards[1].name + ".done")).unlink()
    (tmp_path / ".part-00009-deadbeef.parquet.tmp").write_bytes(b"half")
    assert done_keys(tmp_path) == {"k0", "k1"}
    removed = clean_incomplete(tmp_path)
    assert {p.name for p in removed} == {shards[1].name, ".part-00009-deadbeef.parquet.tmp"}
    # A new writer never reuses a name that exists.
    w2 = ShardWriter(tmp_path, rows_per_shard=2)
    assert w2.write_table(pq.read_table(shards[0])).name.startswith("part-00001-")


def test_marker_records_checksum(tmp_path):
    w = ShardWriter(tmp_path, rows_per_shard=1)
    w.add(CaptionRow(key="a"))
    shard = complete_shards(tmp_path)[0]
    marker = json.loads((shard.parent / (shard.name + ".done")).read_text())
    from shards.writer import sha256_file

    assert marker["sha256"] == sha256_file(shard) and marker["rows"] == 1


def test_iter_batches_on_empty_dir_is_a_user_error(tmp_path):
    with pytest.raises(ShardError, match="no complete shards"):
        list(iter_batches(tmp_path))


def test_manifest_versions_are_read_once_per_process(tmp_path, monkeypatch):
    from importlib import metadata

    from shards import writer

    calls = []
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: calls.append(name) or real(name))
    writer._installed_versions.cache_clear()
    first = writer.write_manifest(tmp_path)["versions"]
    n = len(calls)
    assert n > 0 and first["pyarrow"] == real("pyarrow")
    first["pyarrow"] = "changed by a caller"
    assert writer.write_manifest(tmp_path)["versions"]["pyarrow"] == real("pyarrow")  # the cache hands out copies
    assert len(calls) == n  # the installed metadata was not read again
    writer._installed_versions.cache_clear()
