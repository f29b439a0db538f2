"""Caption shards load with Hugging Face `datasets` (`load_dataset("parquet", data_files=...)`)."""

from __future__ import annotations

import pytest

from shards.reader import complete_shards
from shards.schema import CAPTION_SCHEMA, CaptionRow
from shards.writer import ShardWriter


def test_caption_shards_load_with_hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="pip install -e '.[dev]' (datasets is in the dev extra)")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    out = tmp_path / "shards"
    w = ShardWriter(out, rows_per_shard=3)
    rows = [CaptionRow(key=f"k{i}", width=64, height=48, caption=f"A dog number {i}.", num_tokens=5, image=b"\xff\xd8jpg")
            for i in range(7)]
    rows.append(CaptionRow(key="bad", error="unreadable image"))
    w.add_many(rows)
    w.close()
    files = [str(p) for p in complete_shards(out)]
    assert len(files) == 3

    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 8
    assert ds.column_names == CAPTION_SCHEMA.names
    assert sorted(ds["key"]) == sorted(r.key for r in rows)
    by_key = {r["key"]: r for r in ds}
    assert by_key["k3"]["caption"] == "A dog number 3." and by_key["k3"]["image"] == b"\xff\xd8jpg"
    assert by_key["bad"]["caption"] is None and by_key["bad"]["error"] == "unreadable image"
    glob = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert glob.num_rows == 8  # the directory's shards by glob (no partial shards here)
