"""The `phash` scorer's whole-dataset pass: groups of images whose pHashes are within a Hamming
distance (recompressed, resized, lightly edited copies), without comparing every pair.

Multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing", 2012): the 64 bits are cut into m chunks; two hashes within distance d agree to within
floor(d / m) bits on at least one chunk (pigeonhole). Per chunk, the hashes are sorted by the
chunk's value into a dense table (2^bits buckets), and each hash looks up the buckets of its own
value with up to floor(d / m) bits flipped; only the hashes found there are compared in full.
m is picked by a cost model (bucket look-ups + expected candidates), and no chunk is wider than
24 bits, so a table stays within 128 MB. At 10M hashes and d = 4: three 21-22-bit chunks, 23
look-ups each per hash, ~5 candidates per look-up.

Streaming and memory: the pass reads the score shards' `phash` column alone (8 bytes a row), works
on the distinct hashes (one node per value: 100k identical blank images are one node, not 5e9
pairs), checks candidate pairs a block of queries at a time, and merges the pairs found into a
union-find held in one array. A second read streams the keys into the output, a shard per 250k
rows; only the keys of groups' representatives are held meanwhile. No Python object per row.
A group's representative is its first row in shard order.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.reader import complete_shards, iter_batches
from curate.phash import hamming

MAX_CHUNK_BITS = 24
BLOCK_PAIRS = 1 << 22  # candidate pairs checked at once (bounds the pass's working memory)
PHASH_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("phash_duplicate", pa.bool_()),  # in a group, and not its representative
    pa.field("phash_group", pa.string()),  # the representative's key; null for rows without a hash
    pa.field("phash_group_size", pa.int32()),
])  # fmt: skip


def chunk_plan(n: int, distance: int) -> list[tuple[int, int]]:
    """(shift, bits) of each chunk: the split of 64 bits with the least expected work for `n`
    hashes within `distance` (per chunk: look-ups of every flip pattern, then candidates)."""
    best, plan = None, []
    for m in range(3, 17):
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        if max(widths) > MAX_CHUNK_BITS:
            continue
        radius = distance // m
        probes = [sum(_comb(w, r) for r in range(radius + 1)) for w in widths]
        cost = sum(p * (n + n * n / 2.0**w) for p, w in zip(probes, widths))
        if best is None or cost < best:
            shifts = np.cumsum([0] + widths[:-1]).tolist()
            best, plan = cost, list(zip(shifts, widths))
    return plan


def _comb(n: int, r: int) -> int:
    from math import comb

    return comb(n, r)


def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-wide mask with at most `radius` bits set (0 first)."""
    masks = [sum(1 << b for b in combo) for r in range(radius + 1) for combo in combinations(range(bits), r)]
    return np.array(masks, np.int64)


def near_pairs(codes: np.ndarray, distance: int, block_pairs: int = BLOCK_PAIRS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of index pairs (a, b), a < b, of distinct uint64 `codes` within `distance` bits.
    A pair may come more than once (from several chunks)."""
    n = len(codes)
    if n < 2 or distance < 1:
        return
    plan = chunk_plan(n, distance)
    for shift, bits in plan:
        values = ((codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        order = np.argsort(values, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(values, minlength=1 << bits))])
        for mask in flip_masks(bits, distance // len(plan)):
            target = values ^ mask
            lo, hi = starts[target], starts[target + 1]
            yield from _check(codes, order, lo, hi - lo, distance, block_pairs)


def _check(codes: np.ndarray, order: np.ndarray, lo: np.ndarray, count: np.ndarray, distance: int,
           block_pairs: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs (query i, each of the `count[i]` hashes at order[lo[i]:]) within `distance`,
    a < b, expanded a block of queries at a time."""
    queries = np.flatnonzero(count)
    if not len(queries):
        return
    ends = np.cumsum(count[queries])
    first = 0
    while first < len(queries):
        last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + block_pairs, "right"))
        last = max(last, first + 1)
        q = queries[first:last]
        reps = count[q]
        a = np.repeat(q, reps)
        offsets = np.arange(len(a)) - np.repeat(np.cumsum(reps) - reps, reps)
        b = order[np.repeat(lo[q], reps) + offsets]
        keep = (a < b) & (hamming(codes[a], codes[b]) <= distance)
        if keep.any():
            yield a[keep], b[keep]
        first = last


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of each pair (a[i], b[i]) in the union-find `parent` (a root is its set's
    smallest member), all pairs at once: hook each larger root under the smaller, repeat until
    every pair shares a root; then the pairs' nodes point at their roots (path compression)."""
    nodes = np.concatenate([a, b])
    while len(a):
        ra, rb = roots(parent, a), roots(parent, b)
        apart = ra != rb
        if not apart.any():
            break
        lo, hi = np.minimum(ra[apart], rb[apart]), np.maximum(ra[apart], rb[apart])
        np.minimum.at(parent, hi, lo)
        a, b = lo, hi
    parent[nodes] = roots(parent, nodes)


def roots(parent: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
    """The root of each of `nodes` (default: of every node), by pointer jumping."""
    r = parent if nodes is None else parent[nodes]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def read_hashes(score_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash per score row, whether the row has one), in shard order: the `phash` column alone."""
    hashes, valid = [], []
    for rb in iter_batches(complete_shards(score_dir), ["phash"], 1 << 16):
        col = rb.column("phash")
        valid.append(~np.asarray(col.is_null()))
        hashes.append(np.asarray(col.fill_null(0), np.uint64))
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    return np.concatenate(hashes), np.concatenate(valid)


def group_rows(hashes: np.ndarray, valid: np.ndarray, distance: int) -> np.ndarray:
    """Each row's representative row (the first row of its group; -1 for rows without a hash)."""
    rows = np.flatnonzero(valid)
    codes, node = np.unique(hashes[rows], return_inverse=True)
    parent = np.arange(len(codes))
    for a, b in near_pairs(codes, distance):
        union(parent, a, b)
    component = roots(parent)[node.ravel()]  # per valid row, in row order
    _, first = np.unique(component, return_index=True)
    first_row = np.empty(len(codes), np.int64)
    first_row[component[first]] = rows[first]
    rep = np.full(len(hashes), -1, np.int64)
    rep[rows] = first_row[component]
    return rep


def find_phash_groups(score_dir: str | Path, distance: int = 4, rows_per_table: int = 250_000) -> Iterator[pa.Table]:
    """PHASH_SCHEMA tables, one row per score row in shard order, `rows_per_table` rows each:
    the rows whose pHashes are within `distance` bits, transitively, share a group."""
    hashes, valid = read_hashes(score_dir)
    rep = group_rows(hashes, valid, distance)
    del hashes, valid
    sizes = np.bincount(rep[rep >= 0], minlength=len(rep))
    rep_keys: dict[int, str] = {}  # the keys of representatives of groups with more than one row
    start, pending = 0, []
    for rb in iter_batches(complete_shards(score_dir), ["key"], rows_per_table):
        keys = pa.concat_arrays([rb.column("key")])
        r = rep[start : start + len(keys)]
        own = np.arange(start, start + len(keys))
        for i in np.flatnonzero((r == own) & (sizes[np.maximum(r, 0)] > 1)).tolist():
            rep_keys[start + i] = keys[i].as_py()
        pending.append(_table(keys, r, own, sizes, rep_keys))
        start += len(keys)
        if sum(t.num_rows for t in pending) >= rows_per_table:  # a batch ends at its shard's end: gather
            yield pa.concat_tables(pending).combine_chunks()
            pending = []
    if pending:
        yield pa.concat_tables(pending).combine_chunks()


def _table(keys: pa.Array, rep: np.ndarray, own: np.ndarray, sizes: np.ndarray, rep_keys: dict[int, str]) -> pa.Table:
    """The output rows of one batch: `rep`, each row's representative row (-1: no hash)."""
    copies = (rep >= 0) & (rep != own)
    group = keys
    if copies.any():  # only the copies look their group's key up (few rows)
        group = pc.replace_with_mask(keys, pa.array(copies), pa.array([rep_keys[int(x)] for x in rep[copies]], pa.string()))
    none = pa.array(rep < 0)
    return pa.table({"key": keys, "phash_duplicate": copies,
                     "phash_group": pc.if_else(none, pa.scalar(None, pa.string()), group),
                     "phash_group_size": pa.array(sizes[np.maximum(rep, 0)].astype(np.int32), mask=rep < 0)},
                    schema=PHASH_SCHEMA)  # fmt: skip
