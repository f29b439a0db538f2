"""Several captions per image (Sana-style): which caption-shard fields features encodes, where
each field's T5 features live in a feature row, and which field a sample trains on at a step.

    caption_fields = ["caption", "caption_short"]   # TrainConfig / manifest stage
    caption_weights = [3, 1]                          # optional; default: equal

- Fields are the caption-shard text columns: `caption`, `caption_<prompt>` (`t2i-data caption
  --prompts dense,short` writes `caption_short`, ...) and `alt_text`.
- Feature rows keep `caption` in today's columns (`text_emb`, `text_len`) and any other field f
  in `text_emb_<f>` / `text_len_<f>` (its text in column f), so a features directory of the
  default single `caption` field is exactly what it always was.
- The loader picks one field per sample and epoch (a sample is seen once per epoch) from a hash
  of (seed, epoch, sample): the same on every rank, run and resume. Only the fields an image has
  are candidates, with the weights renormalised over them. With `caption_scores` the weights are
  per sample, from how well each field matches its image (t2i.caption_scores).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from shards.errors import UserError
from shards.schema import CAPTION_SCHEMA

DEFAULT_FIELDS = ("caption",)
CAPTION_FIELDS = tuple(n for n in CAPTION_SCHEMA.names if n == "caption" or n.startswith("caption_")) + ("alt_text",)


class TextColumns(NamedTuple):
    """The feature-row columns of one caption field."""

    text: str  # the caption text
    emb: str  # T5 features (text_len, channels) in text_dtype; null when the image lacks the field
    len: str  # tokens kept by the attention mask; null when the image lacks the field
    scale: str  # compact text_dtype (int8, fp8; t2i.text_codec): a float32 scale per token; absent otherwise


def text_columns(field: str) -> TextColumns:
    if field == "caption":
        return TextColumns("caption", "text_emb", "text_len", "text_scale")
    return TextColumns(field, f"text_emb_{field}", f"text_len_{field}", f"text_scale_{field}")


def _items(value: str | Iterable) -> list:
    """A comma-separated string (the CLI) or a list (TOML) as a list of stripped items."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_fields(value: str | Iterable[str]) -> tuple[str, ...]:
    """caption_fields as a tuple of known, distinct field names (one-line error otherwise)."""
    fields = tuple(str(f) for f in _items(value))
    if not fields:
        raise UserError("caption_fields is empty: name at least one field, e.g. caption")
    for f in fields:
        if f not in CAPTION_FIELDS:
            raise UserError(f"caption field {f!r} is not a caption-shard text field: pick from {', '.join(CAPTION_FIELDS)} "
                            "(caption_<name> is written by `t2i-data caption --prompts ...,<name>`)")
    if len(set(fields)) < len(fields):
        raise UserError(f"caption_fields {', '.join(fields)} names a field twice: name each field once")
    return fields


def parse_weights(value: str | Iterable[float], fields: tuple[str, ...]) -> tuple[float, ...]:
    """caption_weights as positive floats, one per field (empty: equal weights)."""
    try:
        weights = tuple(float(w) for w in _items(value))
    except (TypeError, ValueError):
        raise UserError(f"caption_weights {value!r} are not numbers: give one positive number per caption field") from None
    if weights and (len(weights) != len(fields) or min(weights) <= 0 or not np.isfinite(weights).all()):
        raise UserError(f"caption_weights {', '.join(map(str, weights))} do not fit caption_fields {', '.join(fields)}: "
                        "give one positive number per field (or none: equal weights)")
    return weights


def normalised(weights: tuple[float, ...], n: int) -> np.ndarray:
    w = np.asarray(weights or (1.0,) * n, np.float64)
    return w / w.sum()


_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each element (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, samples: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per sample, fixed by (seed, epoch, sample) alone."""
    gamma = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: no input maps to a fixed 0
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed & _MASK], np.uint64) + gamma)
        base = _mix(base + np.uint64(epoch & _MASK) + gamma)
        z = _mix(base + np.asarray(samples, np.uint64) + gamma)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def pick_fields(u: np.ndarray, weights: np.ndarray, has: np.ndarray) -> np.ndarray:
    """The field id of each sample: field f with probability weights[f] (or, per sample,
    weights[i, f]) among the fields the sample has (`has`: a bit per field; a sample has at least one)."""
    weights = np.asarray(weights, np.float64)
    present = (has[:, None] >> np.arange(weights.shape[-1], dtype=has.dtype)) & 1
    cum = np.cumsum((weights if weights.ndim == 2 else weights[None, :]) * present, axis=1)
    # the first field whose cumulative weight passes u x total (fields without weight never do)
    return (cum <= (u * cum[:, -1])[:, None]).sum(1).astype(np.uint8)
