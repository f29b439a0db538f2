"""The `phash` scorer's whole-dataset pass: groups of images whose pHashes are within a Hamming
distance (recompressed, resized, lightly edited copies), without comparing every pair.

Multi-index hashing (Norouzi, Punjani & Fleet, "Fast search in Hamming space with multi-index
hashing", 2012), two ways, the cheaper for the data's size by a cost model (sorts or look-ups per
hash, plus expected candidates, each in ~20 ns units measured on this code):
- exact keys: the 64 bits are cut into m > d chunks; two hashes within distance d differ in at
  most d chunks, so they agree exactly on some m - d of them (pigeonhole). Per set of m - d
  chunks, the hashes are sorted by those chunks' bits (key and index packed in one uint64: a plain
  sort), and only the hashes in a run of equal keys are compared in full. A pair is kept for the
  first set it agrees on alone, so each near pair comes once. At 10M hashes and d = 4: 7 chunks of
  9-10 bits, 35 sorts by 27-28-bit keys, ~0.04 candidates per hash and sort.
- flipped look-ups: m chunks, each hash looks up its own value of each chunk, in a dense table,
  with up to floor(d / m) bits flipped (no chunk wider than 24 bits: a table within 128 MB).
  Cheaper at large distances (d = 12 from ~3M hashes).
The flipped look-ups alone, at d = 4, made ~5 candidates per look-up at 10M hashes (n / 2^21,
growing with n): 4x the work per hash of 1M, and past 15 minutes on a loaded 2-core machine.

Streaming and memory: the pass reads the score shards' `phash` column alone (8 bytes a row), works
on the distinct hashes (one node per value: 100k identical blank images are one node, not 5e9
pairs), checks candidate pairs a block of queries at a time, and merges the pairs found into a
union-find held in one array. A second read streams the keys into the output, a shard per 250k
rows; only the keys of groups' representatives are held meanwhile. No Python object per row.
A group's representative is its first row in shard order.
"""

from __future__ import annotations

from itertools import combinations
from math import comb
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.reader import complete_shards, iter_batches
from curate.phash import hamming

MAX_CHUNK_BITS = 24
BLOCK_PAIRS = 1 << 22  # candidate pairs checked at once (bounds the pass's working memory)
MAX_KEY_SETS = 5000  # the exact-key way's sorts, at most
PHASH_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("phash_duplicate", pa.bool_()),  # in a group, and not its representative
    pa.field("phash_group", pa.string()),  # the representative's key; null for rows without a hash
    pa.field("phash_group_size", pa.int32()),
])  # fmt: skip


SORT_COST, LOOKUP_COST, CANDIDATE_COST = 2.0, 1.0, 2.0  # per hash and table, per look-up, per candidate (~20 ns units)


def _chunks(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m contiguous chunks covering 64 bits, the wider ones first."""
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    return list(zip(np.cumsum([0] + widths[:-1]).tolist(), widths))


def flip_plan(n: int, distance: int) -> tuple[float, list[tuple[int, int]]]:
    """(expected work, chunks) of the flip-probe way: m chunks, each hash looks up its own value
    of each chunk with up to floor(distance / m) bits flipped (look-ups, then candidates)."""
    best = (float("inf"), [])
    for m in range(3, 17):
        chunks = _chunks(m)
        if max(w for _, w in chunks) > MAX_CHUNK_BITS:
            continue
        probes = [sum(comb(w, r) for r in range(distance // m + 1)) for _, w in chunks]
        cost = sum(p * (n * LOOKUP_COST + n * n / 2.0**w * CANDIDATE_COST) for p, (_, w) in zip(probes, chunks))
        best = min(best, (cost, chunks), key=lambda c: c[0])
    return best


def exact_plan(n: int, distance: int) -> tuple[float, list[tuple[int, int]]]:
    """(expected work, chunks) of the exact-key way: two hashes within `distance` differ in at
    most `distance` of m > distance chunks, so they agree exactly on some m - distance of them;
    each such set of chunks is a sort key (a sort per set, then the pairs within equal keys)."""
    best = (float("inf"), [])
    for m in range(distance + 1, 65):
        sets = comb(m, distance)
        if sets > MAX_KEY_SETS:
            break
        bits = (m - distance) * 64 / m  # a key's width, on average
        sort = SORT_COST * (1 if bits + max(1, (n - 1).bit_length()) <= 64 else 2.5)  # packed sort, else argsort
        cost = sets * (n * sort + n * n / 2.0 ** (bits + 1) * CANDIDATE_COST)
        best = min(best, (cost, _chunks(m)), key=lambda c: c[0])
    return best


def chunk_plan(n: int, distance: int) -> tuple[str, list[tuple[int, int]]]:
    """("flip" or "exact", its chunks as (shift, bits)): the way with the least expected work for
    `n` distinct hashes within `distance` bits."""
    flip, exact = flip_plan(n, distance), exact_plan(n, distance)
    return ("flip", flip[1]) if flip[0] < exact[0] else ("exact", exact[1])


def flip_masks(bits: int, radius: int) -> np.ndarray:
    """Every `bits`-wide mask with at most `radius` bits set (0 first)."""
    masks = [sum(1 << b for b in combo) for r in range(radius + 1) for combo in combinations(range(bits), r)]
    return np.array(masks, np.int64)


def near_pairs(codes: np.ndarray, distance: int, way: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of index pairs (a, b) of distinct uint64 `codes` within `distance` bits (`way`:
    "flip" or "exact", default the cheaper by the cost model). A pair may come more than once."""
    n = len(codes)
    if n < 2 or distance < 1:
        return
    kind, chunks = chunk_plan(n, distance)
    if way is not None and way != kind:
        kind, chunks = way, (flip_plan if way == "flip" else exact_plan)(n, distance)[1]
    yield from (_flip_pairs if kind == "flip" else _exact_pairs)(codes, chunks, distance)


def _flip_pairs(codes: np.ndarray, chunks: list[tuple[int, int]], distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per chunk, a dense table of the hashes by the chunk's value; each hash looks up its value
    with up to floor(distance / m) bits flipped. A pair is kept once per look-up (a < b)."""
    for shift, bits in chunks:
        values = ((codes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        order = np.argsort(values, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(values, minlength=1 << bits))])
        for mask in flip_masks(bits, distance // len(chunks)):
            target = values ^ mask
            lo, count = starts[target], starts[target + 1] - starts[target]
            q = np.flatnonzero(count)
            yield from _check(codes, order, q, lo[q], count[q], distance, ordered=True)


def _exact_pairs(codes: np.ndarray, chunks: list[tuple[int, int]], distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per set of m - distance chunks, the hashes sorted by those chunks' bits; each pair within
    a run of equal keys is checked once, and kept only for the first set (in combinations'
    order) of chunks the pair agrees on: every near pair comes exactly once."""
    n, idx_bits = len(codes), max(1, (len(codes) - 1).bit_length())
    masks = [np.uint64(((1 << w) - 1) << s) for s, w in chunks]
    for chosen in combinations(range(len(chunks)), len(chunks) - distance):
        packed = sum(chunks[c][1] for c in chosen) + idx_bits <= 64  # key over index in one word: a plain sort, ~5x faster than argsort
        key, bits = (np.arange(n, dtype=np.uint64), idx_bits) if packed else (np.zeros(n, np.uint64), 0)
        for c in chosen:
            key |= ((codes >> np.uint64(chunks[c][0])) & np.uint64((1 << chunks[c][1]) - 1)) << np.uint64(bits)
            bits += chunks[c][1]
        if packed:
            key.sort()
            order, key = (key & np.uint64((1 << idx_bits) - 1)).astype(np.int64), key >> np.uint64(idx_bits)
        else:
            order = np.argsort(key)
            key = key[order]
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
        del key
        lens = np.diff(np.append(starts, n))
        starts, lens = starts[lens > 1], lens[lens > 1]
        pos = np.repeat(starts, lens) + _ranks(lens)  # every position in a run of two or more
        count = np.repeat(starts + lens, lens) - pos - 1
        q = pos[count > 0]
        earlier = [masks[k] for k in range(chosen[-1]) if k not in chosen]
        for a, b in _check(codes, order, q, q + 1, count[count > 0], distance, owner=order):
            x = codes[a] ^ codes[b]
            keep = np.ones(len(a), bool)
            for mk in earlier:  # agreeing on an earlier chunk: an earlier set found this pair
                keep &= (x & mk) != 0
            yield a[keep], b[keep]


def _ranks(lens: np.ndarray) -> np.ndarray:
    """0, 1, ..., lens[i] - 1 for each i, concatenated."""
    return np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)


def _check(codes: np.ndarray, order: np.ndarray, q: np.ndarray, lo: np.ndarray, count: np.ndarray, distance: int,
           owner: np.ndarray | None = None, ordered: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs (query q[i] (or owner[q[i]]), each of the `count[i]` hashes at order[lo[i]:])
    within `distance` (and a < b if `ordered`), expanded a block of about BLOCK_PAIRS pairs at a time."""
    if not len(q):
        return
    ends, first = np.cumsum(count), 0
    while first < len(q):
        last = max(int(np.searchsorted(ends, (ends[first - 1] if first else 0) + BLOCK_PAIRS, "right")), first + 1)
        reps = count[first:last]
        a = np.repeat(q[first:last] if owner is None else owner[q[first:last]], reps)
        b = order[np.repeat(lo[first:last], reps) + _ranks(reps)]
        keep = hamming(codes[a], codes[b]) <= distance
        if ordered:
            keep &= a < b
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
