"""The loader's index of a features directory, cached next to the shards as `index.npz`.

Building the index (`build_index`, what t2i.data.StreamingFeatureDataset holds) reads every
shard's footer and its key/height/width columns: at 10M samples, minutes per open, paid by
every rank of every run.
The cache holds the finished numpy arrays and is used when it matches the directory:

- it is written (atomically: temp file, fsync, rename) only once the directory is complete, i.e.
  its manifest lists exactly the complete shards (the features job has finished);
- it records a fingerprint of the complete shards (name, size, mtime of each) and of the caption
  fields: a rewritten, added or removed shard, or other fields, make it stale, and the index is
  rebuilt (and the cache rewritten);
- a cache that cannot be read or written (read-only directory, damaged file) only costs the rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import ShardError
from shards.hashing import column_hashes as key_hashes
from shards.reader import damaged
from t2i.caption_fields import text_columns

INDEX_FILE = "index.npz"
INDEX_VERSION = 2  # bump when the arrays change meaning (2: key_hash)
INDEX_COLUMNS = ["key", "height", "width"]
BIG_ROW_GROUP = 64 << 20  # uncompressed bytes: bigger groups make every random row read costly


def open_index(features_dir: str | Path, shards: list[str], caption_fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The index arrays of `shards` (the directory's complete shards): the cache when it matches
    them, else built (`build_index`) and cached if the directory is complete."""
    digest = fingerprint(shards, caption_fields)
    arrays = load_index(features_dir, digest)
    if arrays is None:
        arrays = build_index(shards, caption_fields)
        save_index(features_dir, shards, digest, arrays)
    return arrays


def build_index(shards: list[str], caption_fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """shard/group/row of every sample in key order, its key's hash (t2i.noise.string_hashes),
    its bucket, the samples of each bucket (sizes, then members in bucket order) and the caption
    fields it has."""
    # Parquet decoding releases the GIL: shards are indexed in parallel threads (at 10M samples,
    # 10k shards of ~0.2 s each)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda s: index_shard(s, shards[s], caption_fields), range(len(shards))))
    # a stable order independent of shard write order: sort by key (Arrow, no Python strings)
    keys = pa.chunked_array([c for p in parts for c in p["key"].chunks], pa.string())
    order = pc.sort_indices(keys).to_numpy()
    del keys
    index = {c: np.concatenate([p[c] for p in parts])[order] for c in ("shard", "group", "row", "has", "key_hash")}
    if len(caption_fields) == 1:
        index["has"] = index["has"][:0]  # one field, which every sample has
    hw = np.stack([np.concatenate([p[c] for p in parts])[order] for c in ("height", "width")], 1)
    sizes, bucket_of = np.unique(hw, axis=0, return_inverse=True)  # sizes sorted as (h, w) tuples
    bucket_of = bucket_of.ravel()
    return {**index, "sizes": sizes, "bucket_sizes": np.bincount(bucket_of, minlength=len(sizes)),
            "members": np.argsort(bucket_of, kind="stable").astype(np.int32),
            "bucket_of": bucket_of.astype(np.uint16 if len(sizes) < 1 << 16 else np.int32),
            "big_groups": np.flatnonzero([p["big"] for p in parts])}


def index_shard(s: int, path: str, caption_fields: tuple[str, ...]) -> dict:
    """The index columns of shard number `s` (key, height, width: no tensor bytes read), the row
    group and row of each of its rows, the caption fields each row has, and whether it has
    oversized row groups."""
    try:
        return _index_shard(s, path, caption_fields)
    except (pa.ArrowException, OSError) as e:  # truncated, or a page whose checksum fails
        raise damaged(path, e) from None


def _index_shard(s: int, path: str, caption_fields: tuple[str, ...]) -> dict:
    pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
    md = pf.metadata
    columns = [text_columns(f) for f in caption_fields]
    lens = [c.len for c in columns]
    missing = sorted({name for cols in columns for name in (cols.emb, cols.len)} - set(pf.schema_arrow.names))
    if missing:
        raise ShardError(f"{path} has no column {', '.join(missing)}: these features were made for other caption fields "
                         f"than {', '.join(caption_fields)}; make features with the same caption_fields")
    sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], np.int64)
    big = any(md.row_group(g).num_rows > 1 and md.row_group(g).total_byte_size > BIG_ROW_GROUP for g in range(md.num_row_groups))
    t = pf.read(columns=INDEX_COLUMNS + (lens if len(lens) > 1 else []))
    starts = np.cumsum(sizes) - sizes
    has = np.zeros(md.num_rows, np.uint8)
    if len(lens) > 1:
        for bit, name in enumerate(lens):
            has |= (t.column(name).fill_null(0).to_numpy() > 0).astype(np.uint8) << bit
    return {"key": t.column("key"), "key_hash": key_hashes(t.column("key")), "height": t.column("height").to_numpy(), "width": t.column("width").to_numpy(),
            "shard": np.full(md.num_rows, s, np.int32), "group": np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
            "row": (np.arange(md.num_rows) - np.repeat(starts, sizes)).astype(np.int32), "has": has, "big": big}


def fingerprint(shards: list[str], caption_fields: tuple[str, ...]) -> str:
    """A digest of the complete shards (name, bytes, mtime) and the caption fields: one stat a shard."""
    stats = [(Path(s).name, (st := os.stat(s)).st_size, st.st_mtime_ns) for s in shards]
    ident = {"version": INDEX_VERSION, "fields": list(caption_fields), "shards": stats}
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def load_index(features_dir: str | Path, digest: str) -> dict[str, np.ndarray] | None:
    """The cached index arrays when the cache matches `digest` (see fingerprint), else None."""
    path = Path(features_dir) / INDEX_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != digest:
                return None
            return {k: z[k] for k in z.files if k != "fingerprint"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):  # none yet, or damaged: rebuild
        return None


def is_complete(features_dir: str | Path, shards: list[str]) -> bool:
    """Whether the features job has finished: its manifest lists exactly the complete shards."""
    try:
        manifest = json.loads((Path(features_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return sorted(s.get("shard", "") for s in manifest.get("shards", [])) == sorted(Path(s).name for s in shards)


def save_index(features_dir: str | Path, shards: list[str], digest: str, arrays: dict[str, np.ndarray]) -> bool:
    """Write the cache when the directory is complete; whether it was written. Atomic: readers
    see the old cache or the new one, never part of one (several ranks may write at once)."""
    d = Path(features_dir)
    if not is_complete(d, shards):
        return False
    tmp = d / f".{INDEX_FILE}.{os.getpid()}.tmp"  # a crash's leftover is cleaned like a shard's temp file
    try:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(digest), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / INDEX_FILE)
    except OSError:  # a read-only or full features directory trains all the same
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    return True
