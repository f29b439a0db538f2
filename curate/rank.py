"""`select --top COLUMN:P% [--by GROUP]`: the best P% of the rows by a score, per group.

Exactly ceil(P/100 * N) rows are kept of the N rows of each group that pass `--where` and have a
value (`--where` first, then the rank; a null value is removed, as a null fails a `--where`
term). Rows are ranked by value, highest first; rows of equal value by the 64-bit hash of their
key (shards.hashing, the same on every machine and run), lowest first: a rerun keeps the same rows.

Streaming, exact, memory-flat: the rows are never held. Each pass streams the score shards (and
the pass directories it needs, dedup/ and phash/, aligned row by row) for a few columns and
refines a per-group threshold on the rank key (value, then hash, as a 128-bit number) by radix
selection: a histogram of the next 16 bits among the rows still tied with the threshold's prefix
(8 bits with more than 64 groups); once a group's boundary bucket holds at most `COLLECT` rows,
the next pass collects them and the threshold is exact. Typically three passes, then one to
collect the kept keys' hashes (8 bytes per kept row), which select's write pass looks keys up in.
Memory: one batch, the histograms (512 KiB per group at 16 bits), the kept hashes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import fs
from shards.errors import UserError
from shards.hashing import column_hashes
from shards.reader import Shard, complete_shards, iter_batches, read_footer, read_manifest

COLLECT = 1 << 16  # a boundary bucket this small is collected and sorted: the threshold is then exact
MAX_GROUPS = 100_000
BATCH = 1 << 16
_TOP = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%\s*$")


@dataclass(frozen=True)
class Top:
    """A parsed `--top COLUMN:P%`."""

    column: str
    percent: Fraction  # in (0, 100]
    spec: str

    def quota(self, n: int) -> int:
        """ceil(P/100 * n), exactly (no float rounding: 30% of 10 is 3)."""
        return math.ceil(self.percent * n / 100)


def parse_top(spec: str) -> Top:
    """`clip_score:30%` -> Top; a one-line error for anything else or a share outside (0, 100]."""
    m = _TOP.match(spec or "")
    if not m:
        raise UserError(f"bad --top {spec!r}: give COLUMN:P% with 0 < P <= 100, e.g. clip_score:30%")
    percent = Fraction(m.group(2))
    if not 0 < percent <= 100:
        raise UserError(f"bad --top {spec!r}: the share {m.group(2)}% is outside (0, 100]: give e.g. clip_score:30%")
    return Top(m.group(1), percent, spec.strip())


class ScoreSource:
    """The score rows of a score directory as one stream: its shards' columns and those of its
    complete pass directories (dedup/, phash/), which hold one row per score row in shard order."""

    def __init__(self, scores: str | Sequence) -> None:
        from curate.passes import PASSES

        from shards.reader import open_shards

        self.shards = open_shards(scores, "score", f"run `t2i-data score --out {scores}` first")
        self.columns: dict[str, pa.DataType] = {}
        for shard in self.shards:
            for f in shard.schema:
                self.columns.setdefault(f.name, f.type)
        self.passes: dict[str, list[Shard]] = {}
        for name in PASSES:
            d = fs.join(fs.as_location(scores), name)
            if fs.exists(d) and read_manifest(d):
                self.passes[name] = [read_footer(p) for p in complete_shards(d)]
                for f in self.passes[name][0].schema if self.passes[name] else []:
                    self.columns.setdefault(f.name, f.type)
        self.rows = sum(s.rows for s in self.shards)

    def batches(self, columns: Sequence[str]) -> Iterator[pa.Table]:
        """Tables of `columns` (and key), the score shards' batches with the pass rows beside them."""
        wanted = list(dict.fromkeys(["key", *columns]))
        own = [c for c in wanted if any(c in s.columns for s in self.shards)]
        extra = {n: [c for c in wanted if c not in own and c in p[0].columns] for n, p in self.passes.items() if p}
        readers = {n: _Rows(iter_batches(self.passes[n], ["key", *cols], BATCH)) for n, cols in extra.items() if cols}
        for rb in iter_batches(self.shards, own, BATCH):
            table = pa.Table.from_batches([rb])
            for name, reader in readers.items():
                side = reader.take(table.num_rows)
                if side.num_rows != table.num_rows or not pc.all(pc.equal(side["key"], table["key"])).as_py():
                    raise UserError(f"scores/{name}/ does not match the score shards row for row: "
                                    "rerun `t2i-data score` with the same settings")
                for c in extra[name]:
                    table = table.append_column(c, side[c])
            yield table


class _Rows:
    """Take the next n rows, whatever the batch boundaries of the stream below."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self.batches, self.pending = batches, None

    def take(self, n: int) -> pa.Table:
        parts, have = [], 0
        while have < n:
            if self.pending is None:
                nxt = next(self.batches, None)
                if nxt is None:
                    break
                self.pending = pa.Table.from_batches([nxt])
            part = self.pending.slice(0, n - have)
            self.pending = self.pending.slice(n - have) if self.pending.num_rows > n - have else None
            parts.append(part)
            have += part.num_rows
        return pa.concat_tables(parts).combine_chunks() if parts else pa.table({"key": pa.array([], pa.string())})


def rank_keys(values: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 128-bit rank key (hi, lo) of each row: larger is better. hi orders the float64 values
    (an order-preserving map of their bits; -0.0 is 0.0), lo = ~hash: a lower key hash wins a tie."""
    bits = (np.asarray(values, np.float64) + 0.0).view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    hi = np.where(neg, ~bits, bits | np.uint64(1 << 63))
    return hi, ~np.asarray(hashes, np.uint64)


@dataclass
class Groups:
    """The values of the --by column seen so far, each with an id (one group: no --by)."""

    values: pa.Array | None = None

    def ids(self, column: pa.Array | None) -> np.ndarray:
        if column is None:
            return np.zeros(0, np.int64)
        new = pc.unique(column)
        if self.values is not None:
            new = new.filter(pc.invert(pc.is_in(new, value_set=self.values, skip_nulls=False)))
        if len(new):
            self.values = new if self.values is None else pa.concat_arrays([self.values, new.cast(self.values.type)])
            if len(self.values) > MAX_GROUPS:
                raise UserError(f"--by has more than {MAX_GROUPS} distinct values: group by a column with fewer values")
        return np.asarray(pc.index_in(column, value_set=self.values, skip_nulls=False).fill_null(0), np.int64)

    def __len__(self) -> int:
        return 1 if self.values is None else len(self.values)

    def label(self, g: int) -> str:
        return "all" if self.values is None else str(self.values[g].as_py())


@dataclass
class Candidates:
    """One batch's rows that take part in the rank: their group and rank key."""

    group: np.ndarray
    hi: np.ndarray
    lo: np.ndarray


@dataclass
class TopResult:
    """What the rank kept: the kept keys' hashes (sorted), and the rows each step removed."""

    keep: np.ndarray
    kept: int
    removed: list[tuple[str, int]]

    def hit(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Which of `keys` were kept."""
        h = column_hashes(keys)
        at = np.minimum(np.searchsorted(self.keep, h), max(len(self.keep) - 1, 0))
        return (self.keep[at] == h) if len(self.keep) else np.zeros(len(h), bool)


class Ranker:
    """The rank of one select run: the rows of `source` that pass `flags` (a function of a batch
    giving one boolean array per --where term; or `passing`, the keys that passed a --where
    evaluated elsewhere), ranked by `top` within the groups of `by`."""

    def __init__(self, source: ScoreSource, top: Top, by: str | None, flags=None, where_columns: Sequence[str] = (),
                 passing: pa.Array | None = None, terms: Sequence[str] = ()) -> None:
        for name, flag in ((top.column, "--top"), (by, "--by")):
            if name is not None and name not in source.columns:
                raise UserError(f"unknown {flag} column {name!r}: use one of the score columns "
                                f"{', '.join(source.columns)}")
        kind = source.columns[top.column]
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise UserError(f"--top column {top.column!r} holds {kind}, not numbers: "
                            "rank by a numeric score such as clip_score")
        self.source, self.top, self.by, self.flags, self.passing = source, top, by, flags, passing
        self.columns = [top.column, *([by] if by else []), *where_columns]
        self.groups = Groups()
        self.nulls = 0
        self.removed = [(t, 0) for t in terms] + [(f"top {top.spec}" + (f" by {by}" if by else ""), 0)]

    def scan(self, count: bool = False) -> Iterator[Candidates]:
        """The candidates of each batch (with `count`: adding up what each step removed)."""
        for table in self.source.batches(self.columns):
            ok = np.ones(table.num_rows, bool)
            if self.passing is not None:
                ok &= np.asarray(pc.is_in(table["key"], value_set=self.passing))
            elif self.flags is not None:
                for i, f in enumerate(self.flags(table)):
                    if count:
                        self.removed[i] = (self.removed[i][0], self.removed[i][1] + int((ok & ~f).sum()))
                    ok &= f
            value = table[self.top.column]
            values = np.asarray(value.cast(pa.float64()).fill_null(np.nan), np.float64)
            if count:  # a row without a value cannot be ranked: the rank removes it
                self.nulls += int((ok & np.isnan(values)).sum())
            ok &= ~np.isnan(values)
            group = self.groups.ids(table[self.by]) if self.by else np.zeros(table.num_rows, np.int64)
            hi, lo = rank_keys(values[ok], column_hashes(table["key"].filter(pa.array(ok))))
            yield Candidates(group[ok], hi, lo)

    def run(self) -> TopResult:
        """Count, refine the thresholds, then collect the kept keys."""
        counts = np.zeros(0, np.int64)
        for c in self.scan(count=True):
            counts = _add(counts, np.bincount(c.group, minlength=len(self.groups)))
        quota = np.array([self.top.quota(int(n)) for n in counts], np.int64)
        th = _refine(self.scan, counts, quota, bits=16 if len(counts) <= 64 else 8)
        keep = []
        for c in self.scan():
            thi, tlo = th.hi[c.group], th.lo[c.group]
            kept = (c.hi > thi) | ((c.hi == thi) & (c.lo >= tlo))
            keep.append(~c.lo[kept])
        keep = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.uint64)
        label, _ = self.removed[-1]
        self.removed[-1] = (label, self.nulls + int(counts.sum()) - len(keep))
        return TopResult(keep, len(keep), self.removed)


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b for count arrays that may differ in length (new groups appear as batches go)."""
    n = max(len(a), len(b))
    return np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b)))


@dataclass
class Threshold:
    """Per group: the rank-key prefix found so far (hi, lo; bits below `known` are 0), the rows of
    its bucket still to keep (`need`), whether it is final, and whether its bucket is collected next."""

    hi: np.ndarray
    lo: np.ndarray
    known: np.ndarray
    need: np.ndarray
    done: np.ndarray
    collect: np.ndarray

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per group, the masks of the known top bits of hi and lo."""
        ones = np.uint64(0xFFFFFFFFFFFFFFFF)
        k_hi, k_lo = np.minimum(self.known, 64), np.clip(self.known - 64, 0, 64)
        m_hi = np.where(k_hi == 0, np.uint64(0), ones << (np.uint64(64) - k_hi.astype(np.uint64)) % np.uint64(64))
        m_lo = np.where(k_lo == 0, np.uint64(0), ones << (np.uint64(64) - k_lo.astype(np.uint64)) % np.uint64(64))
        return m_hi, m_lo


def _refine(scan, counts: np.ndarray, quota: np.ndarray, bits: int) -> Threshold:
    """Radix selection of each group's threshold (see the module docstring)."""
    g = len(counts)
    z = np.zeros(g, np.uint64)
    th = Threshold(z.copy(), z.copy(), np.zeros(g, np.int64), quota.copy(), quota >= counts, np.zeros(g, bool))
    th.collect = ~th.done & (counts <= COLLECT)
    while not th.done.all():
        m_hi, m_lo = th.masks()
        hist = np.zeros((g, 1 << bits), np.int64) if (~th.done & ~th.collect).any() else None
        gathered: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {int(i): [] for i in np.flatnonzero(th.collect)}
        for c in scan():
            cg = c.group
            live = ~th.done[cg] & ((c.hi & m_hi[cg]) == th.hi[cg]) & ((c.lo & m_lo[cg]) == th.lo[cg])
            grp, hi, lo = cg[live], c.hi[live], c.lo[live]
            coll = th.collect[grp]
            for i in np.unique(grp[coll]).tolist():
                gathered[i].append((hi[coll & (grp == i)], lo[coll & (grp == i)]))
            if hist is not None and (~coll).any():
                hist += _digits(grp[~coll], hi[~coll], lo[~coll], th.known[grp[~coll]], bits, g)
        for i, parts in gathered.items():
            _finish(th, i, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        for i in np.flatnonzero(~th.done & ~th.collect) if hist is not None else []:
            _step(th, int(i), hist[i], bits)
    return th


def _digits(grp: np.ndarray, hi: np.ndarray, lo: np.ndarray, known: np.ndarray, bits: int, groups: int) -> np.ndarray:
    """(groups, 2^bits) counts of the next `bits` bits of each row's rank key, per group."""
    in_hi = known < 64
    shift_hi = np.clip(64 - known - bits, 0, 63).astype(np.uint64)
    shift_lo = np.clip(128 - known - bits, 0, 63).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    digit = np.where(in_hi, (hi >> shift_hi) & mask, (lo >> shift_lo) & mask).astype(np.int64)
    return np.bincount(grp * (1 << bits) + digit, minlength=groups << bits).reshape(groups, 1 << bits)


def _step(th: Threshold, i: int, hist: np.ndarray, bits: int) -> None:
    """Extend group i's prefix by the digit whose bucket holds its boundary row."""
    down = hist[::-1].cumsum()
    at = int(np.searchsorted(down, th.need[i]))
    digit = np.uint64((1 << bits) - 1 - at)
    th.need[i] -= int(down[at] - hist[::-1][at])
    k = int(th.known[i])
    if k < 64:
        th.hi[i] |= digit << np.uint64(64 - k - bits)
    else:
        th.lo[i] |= digit << np.uint64(128 - k - bits)
    th.known[i] = k + bits
    bucket = int(hist[::-1][at])
    th.done[i] = bucket == th.need[i] or th.known[i] >= 128
    th.collect[i] = not th.done[i] and bucket <= COLLECT


def _finish(th: Threshold, i: int, hi: np.ndarray, lo: np.ndarray) -> None:
    """Group i's exact threshold: the need-th highest rank key among its collected rows."""
    order = np.lexsort((lo, hi))[::-1]
    j = order[int(th.need[i]) - 1]
    th.hi[i], th.lo[i], th.known[i] = hi[j], lo[j], 128
    th.done[i], th.collect[i] = True, False
