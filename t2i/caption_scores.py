"""Caption fields drawn by how well they match their image (Sana-style), from `score`'s
`clip_score_<field>` columns (`t2i-data score --scorers captions`: a windowed CLIP score of every
caption field).

    caption_fields = ["caption", "caption_short", "alt_text"]
    caption_scores = "scores/"             # the score directory
    caption_score_temperature = 3.0        # softmax(score / T) over a sample's fields
    caption_score_threshold = 25.0         # optional: fields scoring below it are dropped

Scores are in CLIP-score points, 100 x cosine (Sana's scale: its `clip_thr` is 25). Each sample
trains, per epoch, on one of the fields it has, drawn with probability softmax(score / T) among
those scoring at least the threshold; when none does, on its best-scoring field (as Sana falls
back to the best caption); a sample without scores (no score row, or no score for any of its
fields) is drawn with the fixed caption_weights. Sana's own code weights a caption by
score^(1/T) (= softmax(ln(score) / T)); near a score s, that is softmax(score / (T s)), so its
temperature 0.1 at scores near 30 is about T = 3 here.

Where: when the trainer opens its features directory (t2i.data), the score shards are read once
for these columns and the key alone, streamed, matched to the samples by key hash (the index's,
shards.hashing), and turned into per-sample probabilities kept as float16 (2 bytes per sample and
field: 60 MB at 10M samples and 3 fields, beside the index's ~20 bytes a sample). The draw itself
is the fixed-weight draw's (t2i.caption_fields.pick_fields, from (seed, epoch, sample)), so it is
the same on every rank, rerun and resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.errors import UserError
from shards.hashing import column_hashes
from shards.reader import ShardError, iter_batches, open_shards

POINTS = 100.0  # CLIP-score points per unit of cosine


@dataclass(frozen=True)
class CaptionScoring:
    """Where the caption scores are and how they weight the draw (TrainConfig's settings)."""

    scores: str | Path
    temperature: float = 3.0
    threshold: float | None = None

    def check(self) -> None:
        """One-line errors for a temperature or threshold that cannot weight a draw."""
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise UserError(f"caption_score_temperature {self.temperature} must be a positive number: e.g. 3 (Sana's 0.1 on its power-law scale)")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise UserError(f"caption_score_threshold {self.threshold} is not a number: pass CLIP-score points, e.g. 25 (Sana's clip_thr)")


def softmax_weights(points: np.ndarray, present: np.ndarray, temperature: float, threshold: float | None) -> np.ndarray:
    """(n, F) probabilities: softmax(points / T) over the present fields scoring >= threshold; a
    row where none passes puts all on its best present field; a row with none present is 0."""
    s = np.where(present, points, -np.inf)
    ok = present & (s >= threshold) if threshold is not None else present
    best = np.argmax(s, axis=1)
    fallback = ~ok.any(axis=1) & present.any(axis=1)
    ok[fallback, best[fallback]] = True
    z = np.where(ok, s / temperature, -np.inf)
    top = z.max(axis=1, keepdims=True, initial=-np.inf)
    e = np.where(ok, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def field_probabilities(scoring: CaptionScoring, fields: tuple[str, ...], key_hash: np.ndarray, has: np.ndarray | None,
                        fixed: np.ndarray) -> np.ndarray:
    """(samples, fields) float16: each sample's probability of each caption field (the samples
    in the index's key order: `key_hash`, `has` its field bits; `fixed`: the caption_weights)."""
    columns = [f"clip_score_{f}" for f in fields]
    shards = open_shards(scoring.scores, "score", f"run `t2i-data score --scorers captions --out {scoring.scores}` first")
    if not any(c in s.columns for s in shards for c in columns):
        raise ShardError(f"caption_scores {scoring.scores} has no column {', '.join(columns)}: score the captions with "
                         f"`t2i-data score --scorers captions --out {scoring.scores}`")
    order = np.argsort(key_hash, kind="stable")
    sorted_hash = key_hash[order]
    n, nf = len(key_hash), len(fields)
    present_all = np.ones((n, nf), bool) if has is None else ((has[:, None] >> np.arange(nf, dtype=has.dtype)) & 1).astype(bool)
    probs = np.broadcast_to((fixed / fixed.sum()).astype(np.float16), (n, nf)).copy()  # unscored samples: the fixed weights
    for rb in iter_batches(shards, ["key", *columns], 1 << 16):
        h = column_hashes(rb.column("key"))
        at = np.minimum(np.searchsorted(sorted_hash, h), max(n - 1, 0))
        match = sorted_hash[at] == h if n else np.zeros(len(h), bool)
        idx = order[at[match]]
        points = np.stack([_points(rb, c)[match] for c in columns], axis=1)
        present = present_all[idx] & ~np.isnan(points)
        w = softmax_weights(points, present, scoring.temperature, scoring.threshold)
        scored = present.any(axis=1)
        probs[idx[scored]] = w[scored].astype(np.float16)
    return probs


def _points(rb, column: str) -> np.ndarray:
    """A score column of a batch in CLIP-score points (NaN where null or absent)."""
    if column not in rb.schema.names:
        return np.full(rb.num_rows, np.nan)
    import pyarrow as pa

    return np.asarray(rb.column(column).cast(pa.float64()).fill_null(np.nan), np.float64) * POINTS
