"""The `dedup` scorer's whole-dataset pass: exact duplicates (content SHA-256) and
near-duplicate clusters (CLIP image embeddings within a cosine threshold, found with faiss).

Runs after every score shard is complete, over the score shards' `key`, `content_sha256` and
`clip_image_emb` columns, streamed in batches into a faiss index: exact inner product search up
to `EXACT_LIMIT` rows, an IVF index with 8-bit scalar-quantised vectors beyond (about 1 byte per
dimension per row: 10M ViT-L/14 embeddings take ~7.7 GB), probed with a range search per query
batch. Pairs above the threshold are merged with union-find; a cluster's representative is its
first row in shard order, and every other member is a `near_duplicate` (exact copies included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from shards import fs
from shards.errors import UserError
from shards.reader import complete_shards

EXACT_LIMIT = 200_000
DEDUP_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("exact_duplicate", pa.bool_()),  # same bytes as an earlier row
    pa.field("near_duplicate", pa.bool_()),  # in a cluster, and not its representative
    pa.field("dup_cluster", pa.string()),  # the representative's key; null for rows without embedding
    pa.field("dup_cluster_size", pa.int32()),
])  # fmt: skip


def _iter_embeddings(score_dir: str | Path, batch: int = 8192) -> Iterator[tuple[list[str], list[str | None], np.ndarray, np.ndarray]]:
    """(keys, sha256s, embeddings of the rows that have one, their row numbers in the batch)."""
    for shard in complete_shards(score_dir):
        for rb in fs.parquet_file(shard).iter_batches(batch_size=batch, columns=["key", "content_sha256", "clip_image_emb"]):
            emb = rb.column("clip_image_emb")
            has = np.flatnonzero(~np.asarray(emb.is_null()))
            vecs = np.stack([np.asarray(emb[int(i)].values, np.float32) for i in has]) if len(has) else None
            yield rb.column("key").to_pylist(), rb.column("content_sha256").to_pylist(), vecs, has


def _make_index(score_dir: str | Path, dim: int, n: int):
    """Exact search for up to EXACT_LIMIT rows; beyond, IVF (4 sqrt(n) lists, trained on the
    first 40 vectors per list) over 8-bit quantised vectors, 16 lists probed per query."""
    try:
        import faiss
    except ImportError:
        raise UserError('the dedup scorer needs faiss: pip install "t2i-data[curate]"') from None

    if n <= EXACT_LIMIT:
        return faiss.IndexFlatIP(dim)
    nlist = int(4 * np.sqrt(n))
    sample, have = [], 0
    for _, _, vecs, _ in _iter_embeddings(score_dir):
        if vecs is not None and have < 40 * nlist:
            sample.append(vecs)
            have += len(vecs)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.train(np.concatenate(sample))
    index.nprobe = 16
    return index


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the earlier row stays the root: it is the representative
            self.parent[max(ra, rb)] = min(ra, rb)


def find_duplicates(score_dir: str | Path, threshold: float = 0.95) -> pa.Table:
    """One row per score row in DEDUP_SCHEMA. `threshold`: the cosine at or above which two
    images are near-duplicates."""
    n_rows = sum(fs.parquet_file(s).metadata.num_rows for s in complete_shards(score_dir))
    keys: list[str] = []
    first_by_sha: dict[str, int] = {}
    exact: list[bool] = []
    exact_pairs: list[tuple[int, int]] = []
    rows_with_emb: list[np.ndarray] = []
    index = None
    for batch_keys, shas, vecs, has in _iter_embeddings(score_dir):
        base = len(keys)
        keys.extend(batch_keys)
        for i, sha in enumerate(shas):
            exact.append(sha is not None and sha in first_by_sha)
            if exact[-1]:
                exact_pairs.append((first_by_sha[sha], base + i))
            elif sha is not None:
                first_by_sha[sha] = base + i
        if vecs is None:
            continue
        if index is None:
            index = _make_index(score_dir, vecs.shape[1], n_rows)
        index.add(vecs)
        rows_with_emb.append(base + has)
    uf = _UnionFind(len(keys))
    for a, b in exact_pairs:
        uf.union(a, b)
    if index is not None:
        _merge_near(score_dir, index, np.concatenate(rows_with_emb), threshold, uf)
    return _table(keys, exact, uf, np.concatenate(rows_with_emb) if rows_with_emb else np.zeros(0, int))


def _merge_near(score_dir: str | Path, index, emb_rows: np.ndarray, threshold: float, uf: _UnionFind) -> None:
    """Range-search every embedding against the index (query batches streamed from the shards)."""
    start = 0
    for _, _, vecs, _ in _iter_embeddings(score_dir):
        if vecs is None:
            continue
        lims, _, ids = index.range_search(vecs, threshold)
        for q in range(len(vecs)):
            me = int(emb_rows[start + q])
            for j in ids[lims[q] : lims[q + 1]]:
                uf.union(me, int(emb_rows[int(j)]))
        start += len(vecs)


def _table(keys: list[str], exact: list[bool], uf: _UnionFind, emb_rows: np.ndarray) -> pa.Table:
    roots = np.array([uf.find(i) for i in range(len(keys))], dtype=np.int64)
    sizes = np.bincount(roots, minlength=len(keys))
    in_cluster = np.zeros(len(keys), bool)
    in_cluster[emb_rows] = True
    in_cluster |= np.asarray(exact, bool) | (sizes[roots] > 1)
    return pa.table({
        "key": keys,
        "exact_duplicate": exact,
        "near_duplicate": [bool(roots[i] != i) for i in range(len(keys))],
        "dup_cluster": [keys[roots[i]] if in_cluster[i] else None for i in range(len(keys))],
        "dup_cluster_size": [int(sizes[roots[i]]) for i in range(len(keys))],
    }, schema=DEDUP_SCHEMA)  # fmt: skip
