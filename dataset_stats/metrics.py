"""From nouns to the paper's metrics: DN, VN, VN/DN, nouns per caption, growth, size-matched VN/DN.

Per-caption noun ids go to two flat int32 files on disk (CSR layout: ids + lengths), so memory
stays bounded on 10M+ captions; counts and subsamples are computed from them in blocks.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

BLOCK = 1 << 22  # ids handled per numpy step (16 MiB of int32)


class NounStore:
    """Per-caption noun ids, appended in order, kept on disk (CSR: flat ids + lengths)."""

    def __init__(self, tmpdir: Optional[str | Path] = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="t2i-stats-", dir=tmpdir))
        self._ids = open(self.dir / "ids.i32", "wb")
        self._lengths = open(self.dir / "lengths.i32", "wb")
        self.ids: np.ndarray = np.zeros(0, np.int32)
        self.lengths: np.ndarray = np.zeros(0, np.int32)
        self.offsets: np.ndarray = np.zeros(1, np.int64)

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        ids.astype(np.int32, copy=False).tofile(self._ids)
        lengths.astype(np.int32, copy=False).tofile(self._lengths)

    def finish(self) -> None:
        """Stop appending; map the files for reading."""
        self._ids.close()
        self._lengths.close()
        self.ids = _map(self.dir / "ids.i32")
        self.lengths = np.fromfile(self.dir / "lengths.i32", dtype=np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])

    @property
    def captions(self) -> int:
        return len(self.lengths)

    def counts(self, vocab_size: int) -> np.ndarray:
        """Occurrences of each noun id over all captions."""
        counts = np.zeros(vocab_size, np.int64)
        for start in range(0, len(self.ids), BLOCK):
            counts += np.bincount(self.ids[start : start + BLOCK], minlength=vocab_size)
        return counts

    def sample_counts(self, caption_idx: np.ndarray, vocab_size: int) -> np.ndarray:
        """Occurrences of each noun id over the captions `caption_idx` (sorted for locality)."""
        counts = np.zeros(vocab_size, np.int64)
        caption_idx = np.sort(caption_idx)
        step = max(1, BLOCK // 32)
        for s in range(0, len(caption_idx), step):
            idx = caption_idx[s : s + step]
            starts, lens = self.offsets[idx], self.lengths[idx].astype(np.int64)
            if lens.sum() == 0:
                continue
            # positions of every id of the chosen captions, without a Python loop
            within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
            positions = np.repeat(starts, lens) + within
            counts += np.bincount(self.ids[positions], minlength=vocab_size)
        return counts

    def close(self) -> None:
        self.ids = np.zeros(0, np.int32)  # drop the memmap before deleting its file
        shutil.rmtree(self.dir, ignore_errors=True)


def _map(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.int32, mode="r") if path.stat().st_size else np.zeros(0, np.int32)


def growth_checkpoints(limit: int = 10**9) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... (captions seen at which distinct nouns are recorded)."""
    points, base = [], 1
    while base <= limit:
        points += [base, 2 * base, 5 * base]
        base *= 10
    return [p for p in points if p <= limit]


class NounAccumulator:
    """Collects one dataset's results, chunk by chunk, in reading order."""

    def __init__(self, tmpdir: Optional[str | Path] = None) -> None:
        self.vocab: dict[str, int] = {}
        self.store = NounStore(tmpdir)
        self.rows = 0
        self.null = 0
        self.empty = 0
        self.non_english = 0  # non-empty captions identified as another language
        self.dropped = 0  # of those, left out by --lang en
        self.split = 0  # captions longer than the tagger's piece size, tagged in pieces
        self.words_hist = np.zeros(0, np.int64)
        self.growth: list[tuple[int, int]] = []
        self._checkpoints = growth_checkpoints()
        self._next_cp = 0
        self.seen = 0  # non-empty captions analysed so far

    def add_raw(self, batch: list[Optional[str]]) -> list[str]:
        """Count a batch's rows, null and empty captions; return the captions to analyse."""
        self.rows += len(batch)
        keep = []
        for c in batch:
            if c is None:
                self.null += 1
            elif not c.strip():
                self.empty += 1
            else:
                keep.append(c)
        return keep

    def add_flags(self, foreign: list[bool], kept: list[bool], split: list[bool]) -> None:
        """Count a chunk's non-English, dropped and split captions (one flag per caption)."""
        self.non_english += sum(foreign)
        self.dropped += len(kept) - sum(kept)
        self.split += sum(split)

    def add_result(self, nouns: list[str], lengths: list[int], words: list[int]) -> None:
        """Add the nouns of a chunk of non-empty captions (flat list + nouns per caption)."""
        vocab = self.vocab
        before = len(vocab)
        # new nouns get the next id, so ids also tell when each noun was first seen
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in nouns), dtype=np.int32, count=len(nouns))
        lens = np.asarray(lengths, dtype=np.int32)
        self.store.append(ids, lens)
        self._record_growth(ids, lens, before)
        self.seen += len(lens)
        if words:
            w = np.bincount(np.asarray(words, dtype=np.int64))
            if len(w) > len(self.words_hist):
                w[: len(self.words_hist)] += self.words_hist
                self.words_hist = w
            else:
                self.words_hist[: len(w)] += w

    def _record_growth(self, ids: np.ndarray, lens: np.ndarray, before: int) -> None:
        seen, n = self.seen, len(lens)
        cps = self._checkpoints
        if self._next_cp >= len(cps) or cps[self._next_cp] > seen + n:
            return
        # distinct nouns after each caption of the chunk = max id so far + 1
        running = np.maximum.accumulate(ids) + 1 if len(ids) else np.zeros(0, np.int64)
        ends = np.cumsum(lens) - 1
        while self._next_cp < len(cps) and cps[self._next_cp] <= seen + n:
            k = cps[self._next_cp] - seen - 1  # index of that caption within the chunk
            e = ends[k]
            dn = max(before, int(running[e])) if e >= 0 else before
            self.growth.append((cps[self._next_cp], dn))
            self._next_cp += 1

    def finish(self) -> "DatasetCounts":
        self.store.finish()
        vocab_words = list(self.vocab)  # insertion order == id order
        counts = self.store.counts(len(vocab_words))
        if self.seen and (not self.growth or self.growth[-1][0] != self.seen):
            self.growth.append((self.seen, len(vocab_words)))
        return DatasetCounts(
            rows=self.rows,
            null=self.null,
            empty=self.empty,
            non_english=self.non_english,
            dropped=self.dropped,
            split=self.split,
            words=vocab_words,
            counts=counts,
            store=self.store,
            words_hist=self.words_hist,
            growth=self.growth,
        )


@dataclass
class DatasetCounts:
    """Everything counted for one dataset; `summary()` turns it into the reported metrics."""

    rows: int
    null: int
    empty: int
    non_english: int
    dropped: int
    split: int
    words: list[str]  # noun by id
    counts: np.ndarray  # occurrences by id
    store: NounStore
    words_hist: np.ndarray  # captions by word count
    growth: list[tuple[int, int]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def captions(self) -> int:
        return self.store.captions

    def nouns_hist(self) -> np.ndarray:
        return np.bincount(self.store.lengths) if self.captions else np.zeros(1, np.int64)

    def summary(self, valid_min: int = 10, top: int = 20) -> dict[str, Any]:
        """The metrics of paper Table 1 and the distributions behind them."""
        dn = int((self.counts > 0).sum())
        vn = int((self.counts > valid_min).sum())
        singletons = int((self.counts == 1).sum())
        total = int(self.counts.sum())
        order = np.argsort(-self.counts, kind="stable")[:top]
        out: dict[str, Any] = {
            "rows": self.rows,
            "null_captions": self.null,
            "empty_captions": self.empty,
            "captions": self.captions,
            "non_english_captions": self.non_english,
            "non_english_share": self.non_english / (self.captions + self.dropped) if self.captions + self.dropped else 0.0,
            "dropped_non_english": self.dropped,
            "split_captions": self.split,
            "bad_lines": int(self.extra.get("bad_lines", 0)),
            "total_nouns": total,
            "distinct_nouns": dn,
            "valid_nouns": vn,
            "vn_dn": vn / dn if dn else 0.0,
            "singleton_nouns": singletons,
            "singleton_share": singletons / dn if dn else 0.0,
            "nouns_per_caption": _hist_stats(self.nouns_hist()),
            "words_per_caption": _hist_stats(self.words_hist),
            "top_nouns": [[self.words[i], int(self.counts[i])] for i in order if self.counts[i] > 0],
            "growth": [[c, d] for c, d in self.growth],
        }
        if "images" in self.extra:
            out["images"] = self.extra["images"]
            out["nouns_per_image"] = total / self.extra["images"] if self.extra["images"] else 0.0
        return out

    def close(self) -> None:
        self.store.close()


def _hist_stats(hist: np.ndarray) -> dict[str, Any]:
    """Mean, sd, quantiles and the histogram itself, from counts by value."""
    n = int(hist.sum())
    if n == 0:
        return {"mean": 0.0, "sd": 0.0, "median": 0, "p10": 0, "p90": 0, "max": 0, "histogram": []}
    values = np.arange(len(hist))
    mean = float((values * hist).sum() / n)
    sd = float(np.sqrt(((values - mean) ** 2 * hist).sum() / n))
    cdf = np.cumsum(hist)

    def q(p: float) -> int:
        return int(np.searchsorted(cdf, p * n))

    return {
        "mean": mean,
        "sd": sd,
        "median": q(0.5),
        "p10": q(0.1),
        "p90": q(0.9),
        "max": int(np.nonzero(hist)[0][-1]),
        "histogram": hist.astype(int).tolist(),
    }


def size_matched(
    data: DatasetCounts, sample_size: int, repeats: int = 5, seed: int = 0, valid_min: int = 10
) -> Optional[dict[str, Any]]:
    """VN/DN (and DN, VN, nouns per caption) on `repeats` random subsamples of `sample_size`
    captions, drawn without replacement with a fixed seed: mean and sd. None if too few captions."""
    n = data.captions
    if sample_size <= 0 or n < sample_size:
        return None
    rng = np.random.default_rng(seed)
    draws = 1 if sample_size == n else repeats  # the full set: every draw is the same
    rows = []
    for _ in range(draws):
        idx = np.arange(n) if sample_size == n else rng.choice(n, size=sample_size, replace=False)
        c = data.store.sample_counts(idx, len(data.words))
        dn, vn = int((c > 0).sum()), int((c > valid_min).sum())
        rows.append((vn / dn if dn else 0.0, dn, vn, c.sum() / sample_size))
    a = np.array(rows, dtype=float)
    return {
        "sample_size": sample_size,
        "repeats": draws,
        "seed": seed,
        "vn_dn_mean": float(a[:, 0].mean()),
        "vn_dn_sd": float(a[:, 0].std(ddof=1)) if draws > 1 else 0.0,
        "distinct_nouns_mean": float(a[:, 1].mean()),
        "valid_nouns_mean": float(a[:, 2].mean()),
        "nouns_per_caption_mean": float(a[:, 3].mean()),
    }
