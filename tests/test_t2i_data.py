"""The streaming feature loader (t2i.data): same tensors as the rows on disk, every sample once
per epoch on 1 and 2 ranks, exact resume from a batch position, and an index without tensors."""

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards import ShardWriter, complete_shards
from t2i.data import StreamingFeatureDataset
from t2i import feature_index
from t2i.feature_index import INDEX_FILE
from t2i.loader import make_loader
from t2i.features import FEATURE_SCHEMA

CHANNELS, MAX_TOKENS = 4096, 6
BUCKETS = [(16, 16), (8, 32)]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """61 rows in 3 shards, written in an order unlike key order; float32 text rows of up to
    8 x 4096 (128 KiB), so a shard holds several row groups of several rows; two buckets."""
    d = write_features(tmp_path_factory.mktemp("features"), 61)
    assert len(complete_shards(d)) == 3 and pq.ParquetFile(complete_shards(d)[0]).metadata.num_row_groups >= 2
    return d


def write_features(d: Path, n: int, prefix: str = "features", first: int = 0) -> Path:
    """Rows k<first>..k<first+n-1> as feature shards of 25 rows (in shuffled order), manifest rewritten."""
    rng = np.random.default_rng(first)
    w = ShardWriter(d, rows_per_shard=25, schema=FEATURE_SCHEMA, prefix=prefix)
    for i in first + rng.permutation(n):
        h, wd = BUCKETS[i % 2]
        n = int(rng.integers(1, 9))  # some longer than MAX_TOKENS: truncated
        w.add({"key": f"k{i:03d}", "caption": "c", "height": h, "width": wd, "latent_shape": [4, h // 8, wd // 8],
               "latent_mean": rng.standard_normal((4, h // 8, wd // 8), np.float32).tobytes(),
               "latent_std": rng.random((4, h // 8, wd // 8), np.float32).tobytes(),
               "text_emb": rng.standard_normal((n, CHANNELS), np.float32).tobytes(), "text_len": n,
               "text_channels": CHANNELS, "text_dtype": "float32"})
    w.close()
    return d


def rows_on_disk(d: Path) -> dict[str, dict]:
    return {r["key"]: r for s in complete_shards(d) for r in pq.read_table(s).to_pylist()}


def assert_batch_matches_rows(b, rows: dict[str, dict]) -> None:
    assert len(b.keys) == b.latent_mean.shape[0] == b.text.shape[0] == b.mask.shape[0]
    for i, k in enumerate(b.keys):
        r = rows[k]
        assert (b.height, b.width) == (r["height"], r["width"])
        shape = tuple(r["latent_shape"])
        assert torch.equal(b.latent_mean[i], torch.from_numpy(np.frombuffer(r["latent_mean"], np.float32).copy().reshape(shape)))
        assert torch.equal(b.latent_std[i], torch.from_numpy(np.frombuffer(r["latent_std"], np.float32).copy().reshape(shape)))
        n = min(r["text_len"], MAX_TOKENS)
        text = np.frombuffer(r["text_emb"], np.float32).copy().reshape(-1, CHANNELS)[:n]
        assert torch.equal(b.text[i, :n], torch.from_numpy(text))
        assert not b.text[i, n:].any()  # zero padding
        assert b.mask[i].tolist() == [1] * n + [0] * (MAX_TOKENS - n)


def all_batches(ds, epoch=0, seed=3, global_batch=8, rank=0, world=1, **kw):
    return list(make_loader(ds, epoch, seed, global_batch, rank, world, **kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_rows_on_disk(features, workers):
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    rows = rows_on_disk(features)
    assert len(ds) == 61
    batches = all_batches(ds, workers=workers)
    for b in batches:
        assert_batch_matches_rows(b, rows)
    # in key order: index i is the i-th key, so a batch's keys follow from global_batches alone
    keys = sorted(rows)
    want = [[keys[i] for i in gb] for gb in ds.global_batches(0, 3, 8) if len(gb)]
    assert [b.keys for b in batches] == want
    assert [b.batch_pos for b in batches] == list(range(len(want))) and batches[-1].last_in_epoch


def test_every_sample_once_per_epoch_on_one_and_two_ranks(features):
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    one = [k for b in all_batches(ds, workers=0) for k in b.keys]
    assert sorted(one) == sorted(rows_on_disk(features))  # one rank: all 61, once each
    ranks = [all_batches(ds, rank=r, world=2, workers=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    seen = []
    for b0, b1 in zip(*ranks):
        assert (b0.epoch, b0.batch_pos) == (b1.epoch, b1.batch_pos) and len(b0.keys) == len(b1.keys)
        seen += b0.keys + b1.keys
    assert len(seen) == len(set(seen))
    # with 2 ranks each bucket (31 and 30 samples) may leave one sample for the next epoch
    assert len(seen) == 61 - 1


def test_resume_from_a_batch_position_gives_the_same_batches(features):
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    full = all_batches(ds, epochs=2, workers=0)
    start = 5
    assert full[start].epoch == 0
    resumed = all_batches(ds, start_batch=start, epochs=2, workers=2)
    assert [(b.epoch, b.batch_pos, b.keys) for b in resumed] == [(b.epoch, b.batch_pos, b.keys) for b in full[start:]]
    assert any(b.epoch == 1 for b in resumed)
    # a position past the epoch's last batch continues with the next epoch
    n0 = sum(b.epoch == 0 for b in full)
    after = all_batches(ds, start_batch=n0, epochs=2, workers=0)
    assert after[0].epoch == 1 and after[0].keys == full[n0].keys


def test_loader_leaves_torch_rng_alone(features):
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    state = torch.get_rng_state()
    all_batches(ds, workers=1)
    assert torch.equal(state, torch.get_rng_state())


def test_opening_reads_only_the_index_columns(features, monkeypatch):
    reads = []
    real_read, real_group = pq.ParquetFile.read, pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read", lambda self, columns=None, **kw: reads.append(columns) or real_read(self, columns=columns, **kw))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, columns=None, **kw: reads.append(("group", columns)) or real_group(self, i, columns=columns, **kw))
    (features / INDEX_FILE).unlink(missing_ok=True)  # building the index, not loading its cache
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    assert reads and all(c == ["key", "height", "width"] for c in reads)
    # what stays in memory is numpy index arrays: a few bytes per sample, no tensor bytes
    held = [v for v in vars(ds).values() if isinstance(v, np.ndarray)] + list(ds.buckets.values())
    assert sum(a.nbytes for a in held) <= 20 * len(ds)
    assert not any(isinstance(v, (bytes, list)) and v and isinstance(v[0], bytes) for v in vars(ds).values())
    reads.clear()
    ds.get(np.array([0]))
    assert reads and all(r[0] == "group" for r in reads)  # rows are read by row group, on demand


@pytest.mark.parametrize("workers", [0, 2])
def test_ring_slots_are_reused_and_held_batches_stay_intact(features, workers):
    """Batches come from the shared-memory ring (no fresh memory per batch); a batch still held
    keeps its slot, so later batches never overwrite it."""
    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    rows = rows_on_disk(features)
    loader = make_loader(ds, 0, 3, 8, workers=workers, epochs=3)
    ring = loader.loader.dataset.ring
    base, size = ring._bytes().ctypes.data, len(ring._bytes())
    from_ring = 0
    for b in loader:  # a consumer that drops each batch before the next but one, as train() does
        assert_batch_matches_rows(b, rows)
        from_ring += base <= b.text.data_ptr() < base + size
    assert from_ring == 24  # every batch of 3 epochs
    held = []
    for i, b in enumerate(make_loader(ds, 0, 3, 8, workers=workers, epochs=3)):
        if i % 3 == 0:
            held.append(b)  # kept: its slot stays taken (later batches fall back to fresh memory)
    for b in held:
        assert_batch_matches_rows(b, rows)


def test_pinning_a_ring_batch_frees_its_slot(features, monkeypatch):
    import gc

    from t2i.loader import SlotBatch

    ds = StreamingFeatureDataset(features, MAX_TOKENS)
    loader = make_loader(ds, 0, 3, 8, workers=0)
    ring = loader.loader.dataset.ring
    item = next(iter(loader.loader))  # what the DataLoader's pin thread receives
    assert isinstance(item, SlotBatch) and ring.free.sum() == len(ring.free) - 1
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())  # no CUDA here
    pinned = item.pin_memory()
    gc.collect()
    assert ring.free.sum() == len(ring.free)  # the slot is free again; the pinned copy stays valid
    assert_batch_matches_rows(pinned, rows_on_disk(features))


def test_the_index_is_cached_used_by_every_open_and_worker_and_rebuilt_when_shards_change(tmp_path, monkeypatch):
    d = write_features(tmp_path / "f", 61)
    built = []
    real = feature_index.index_shard
    monkeypatch.setattr(feature_index, "index_shard", lambda s, path, fields: built.append(path) or real(s, path, fields))
    first = StreamingFeatureDataset(d, MAX_TOKENS)
    assert len(built) == 3 and (d / INDEX_FILE).is_file()
    # a second open (another rank, another run) loads the cache: no shard is read, the same index
    built.clear()
    again = StreamingFeatureDataset(d, MAX_TOKENS)
    assert built == []
    for name in ("shard", "group", "row", "bucket_of"):
        assert np.array_equal(getattr(again, name), getattr(first, name)) and getattr(again, name).dtype == getattr(first, name).dtype
    assert {k: v.tolist() for k, v in again.buckets.items()} == {k: v.tolist() for k, v in first.buckets.items()}
    # the loader's workers read batches with the cached index: every sample, the rows on disk
    rows = rows_on_disk(d)
    got = [b for b in all_batches(again, workers=2)]
    assert sorted(k for b in got for k in b.keys) == sorted(rows)
    for b in got:
        assert_batch_matches_rows(b, rows)
    # an added shard (a rerun of features) makes the cache stale: rebuilt, with the new samples
    write_features(d, 5, prefix="features-more", first=61)
    bigger = StreamingFeatureDataset(d, MAX_TOKENS)
    assert len(built) == 4 and len(bigger) == 66
    built.clear()
    assert len(StreamingFeatureDataset(d, MAX_TOKENS)) == 66 and built == []  # and cached again
    # a rewritten shard (its size or mtime changes) too
    shard = complete_shards(d)[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    StreamingFeatureDataset(d, MAX_TOKENS)
    assert len(built) == 4


def test_no_index_cache_is_written_for_an_unfinished_features_directory(tmp_path):
    d = write_features(tmp_path / "f", 30)
    (d / "manifest.json").unlink()  # the features job has not finished
    StreamingFeatureDataset(d, MAX_TOKENS)
    assert not (d / INDEX_FILE).exists()
    (d / INDEX_FILE).write_bytes(b"not an index")  # a damaged cache only costs the rebuild
    write_features(d, 5, prefix="features-more", first=30)
    assert len(StreamingFeatureDataset(d, MAX_TOKENS)) == 35
