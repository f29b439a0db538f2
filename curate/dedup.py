"""The `dedup` scorer's whole-dataset pass: exact duplicates (content SHA-256) and
near-duplicate clusters (CLIP image embeddings within a cosine threshold, found with faiss).

Runs after every score shard is complete, over the score shards' `key`, `content_sha256` and
`clip_image_emb` columns, streamed in batches into a faiss index: exact inner product search up
to `EXACT_LIMIT` rows, an IVF index with 8-bit scalar-quantised vectors beyond (about 1 byte per
dimension per row: 10M ViT-L/14 embeddings take ~7.7 GB), probed with a range search per query
batch. Pairs above the threshold are merged with union-find; a cluster's representative is its
first row in shard order, and every other member is a `near_duplicate` (exact copies included).

Besides the index, a row costs its key (kept in Arrow), a 32-byte digest and a few int64s; no
Python object per row, and the result is written as it is built, a shard per 250k rows.
At 10M rows most of the pass's memory is the faiss index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.errors import UserError
from shards.reader import complete_shards, iter_batches, read_footer

EXACT_LIMIT = 200_000
DEDUP_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("exact_duplicate", pa.bool_()),  # same bytes as an earlier row
    pa.field("near_duplicate", pa.bool_()),  # in a cluster, and not its representative
    pa.field("dup_cluster", pa.string()),  # the representative's key; null for rows without embedding
    pa.field("dup_cluster_size", pa.int32()),
])  # fmt: skip


def _iter_embeddings(score_dir: str | Path, batch: int = 8192) -> Iterator[tuple[pa.Array, pa.Array, np.ndarray | None, np.ndarray]]:
    """(keys, sha256 hex strings, embeddings of the rows that have one, their row numbers in the batch)."""
    for rb in iter_batches(complete_shards(score_dir), ["key", "content_sha256", "clip_image_emb"], batch):
        emb = rb.column("clip_image_emb")
        has = np.flatnonzero(~np.asarray(emb.is_null()))
        vecs = None
        if len(has):  # one flatten of the list column, no per-row Python
            flat = np.asarray(pc.list_flatten(emb.filter(pc.invert(emb.is_null()))), np.float32)
            vecs = flat.reshape(len(has), -1)
        yield pa.concat_arrays([rb.column("key")]), rb.column("content_sha256"), vecs, has  # own buffer: the batch can go


def _digests(shas: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """SHA-256 hex strings as 32-byte rows (`V32`, 32 bytes a row instead of a Python string),
    and which rows have one."""
    valid = ~np.asarray(shas.is_null())
    hexes = shas.fill_null("0" * 64).to_numpy(zero_copy_only=False)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype="V32"), valid


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
    """Union-find over row numbers in one numpy array; the earlier row stays a cluster's root."""

    def __init__(self, parent: np.ndarray) -> None:
        self.parent = parent

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

    def roots(self) -> np.ndarray:
        """Every row's root, by pointer jumping over the whole array at once."""
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                self.parent = p
                return p
            p = q


def find_duplicates(score_dir: str | Path, threshold: float = 0.95, rows_per_table: int = 250_000) -> Iterator[pa.Table]:
    """DEDUP_SCHEMA tables, one row per score row in shard order, `rows_per_table` rows each.
    `threshold`: the cosine at or above which two images are near-duplicates. Memory per row:
    the key (Arrow), a 32-byte digest and a few integers, besides the faiss index."""
    n_rows = sum(read_footer(s).rows for s in complete_shards(score_dir))
    keys: list[pa.Array] = []
    digests: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    rows_with_emb: list[np.ndarray] = []
    index, base = None, 0
    for batch_keys, shas, vecs, has in _iter_embeddings(score_dir):
        keys.append(batch_keys)
        d, v = _digests(shas)
        digests.append(d)
        valid.append(v)
        if vecs is not None:
            if index is None:
                index = _make_index(score_dir, vecs.shape[1], n_rows)
            index.add(vecs)
            rows_with_emb.append(base + has)
        base += len(batch_keys)
    exact, uf = _exact_duplicates(np.concatenate(digests) if digests else np.zeros(0, "V32"),
                                  np.concatenate(valid) if valid else np.zeros(0, bool))
    emb_rows = np.concatenate(rows_with_emb) if rows_with_emb else np.zeros(0, np.int64)
    if index is not None:
        _merge_near(score_dir, index, emb_rows, threshold, uf)
    yield from _tables(pa.chunked_array(keys, pa.string()), exact, uf.roots(), emb_rows, rows_per_table)


def _exact_duplicates(digests: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, _UnionFind]:
    """Rows whose bytes an earlier row has, and a union-find with each joined to that first row.
    One lexsort over the digests' four 64-bit words (then row number), so each group of equal
    digests is contiguous with its earliest row first."""
    rows = np.flatnonzero(valid)
    parent = np.arange(len(digests))
    if len(rows):
        words = digests[rows].view(np.uint64).reshape(-1, 4)
        order = np.lexsort((rows, words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
        w = words[order]
        starts = np.concatenate([[True], np.any(w[1:] != w[:-1], axis=1)])
        group_first = rows[order][np.flatnonzero(starts)]
        parent[rows[order]] = group_first[np.cumsum(starts) - 1]
    return parent != np.arange(len(digests)), _UnionFind(parent)


def _merge_near(score_dir: str | Path, index, emb_rows: np.ndarray, threshold: float, uf: _UnionFind) -> None:
    """Range-search every embedding against the index (query batches streamed from the shards)."""
    start = 0
    for _, _, vecs, _ in _iter_embeddings(score_dir):
        if vecs is None:
            continue
        lims, _, ids = index.range_search(vecs, threshold)
        me = np.repeat(emb_rows[start : start + len(vecs)], np.diff(lims.astype(np.int64)))
        other = emb_rows[ids.astype(np.int64)]
        for a, b in zip(me[me != other].tolist(), other[me != other].tolist()):  # self-matches skipped
            uf.union(a, b)
        start += len(vecs)


def _tables(keys: pa.ChunkedArray, exact: np.ndarray, roots: np.ndarray, emb_rows: np.ndarray, rows_per_table: int) -> Iterator[pa.Table]:
    sizes = np.bincount(roots, minlength=len(roots))
    in_cluster = np.zeros(len(roots), bool)
    in_cluster[emb_rows] = True
    in_cluster |= exact | (sizes[roots] > 1)
    for s in range(0, len(roots), rows_per_table):
        part = slice(s, s + rows_per_table)
        r = roots[part]
        yield pa.table({
            "key": keys.slice(s, len(r)),
            "exact_duplicate": exact[part],
            "near_duplicate": r != np.arange(s, s + len(r)),
            "dup_cluster": pc.if_else(pa.array(in_cluster[part]), keys.take(pa.array(r)), pa.scalar(None, pa.string())),
            "dup_cluster_size": sizes[r].astype(np.int32),
        }, schema=DEDUP_SCHEMA)  # fmt: skip
