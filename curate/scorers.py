"""The scorers and the per-batch scoring function both engines call.

`Scorers.load(names, ...)` loads the models once; `score_batch(rows, scorers)` turns a batch of
caption rows (dicts with key, source, member, image, caption, alt_text) into score rows in
`scorers.schema`. An unreadable image or a missing source gives a row with `error` set (its
text scores are still filled); it never stops the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from shards.images import ImageError
from shards.errors import UserError
from curate.images import LoadedImage, read_image

SCORERS = ("clip", "aesthetic", "dedup", "nsfw", "lang", "image")
NEEDS_CLIP = ("clip", "aesthetic", "dedup")  # they reuse the CLIP image embedding

_COLUMNS: dict[str, list[pa.Field]] = {
    "image": [pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("aspect", pa.float32()),
              pa.field("blur", pa.float32()), pa.field("jpeg_quality", pa.int32()), pa.field("file_bytes", pa.int64())],
    "clip": [pa.field("clip_score", pa.float32()), pa.field("clip_image_emb", pa.list_(pa.float32())),
             pa.field("clip_text_emb", pa.list_(pa.float32()))],
    "aesthetic": [pa.field("aesthetic", pa.float32())],
    "dedup": [pa.field("content_sha256", pa.string())],
    "nsfw": [pa.field("nsfw", pa.float32()), pa.field("nsfw_labels", pa.string())],
    "lang": [pa.field("lang", pa.string()), pa.field("lang_prob", pa.float32())],
}  # fmt: skip


def parse_scorers(spec: str | list[str]) -> list[str]:
    """`clip,aesthetic` -> the scorer names in canonical order (clip added when another needs it)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise UserError(f"unknown scorer {', '.join(unknown) or '(none)'}: use some of {','.join(SCORERS)}")
    if any(n in NEEDS_CLIP for n in names):
        names.append("clip")
    return [s for s in SCORERS if s in names]


def score_schema(names: list[str]) -> pa.Schema:
    fields = [pa.field("key", pa.string(), nullable=False)] + [f for n in names for f in _COLUMNS[n]]
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields, metadata={b"t2i_data.schema": b"scores", b"t2i_data.schema_version": b"1"})


@dataclass
class Scorers:
    """Loaded models for the chosen scorers, plus decoding settings."""

    names: list[str]
    clip: object | None = None  # shards.models.clip.ClipEmbedder
    aesthetic: object | None = None  # shards.models.aesthetic.AestheticMLP
    nsfw: object | None = None  # curate.safety.NsfwDetector
    lang: object | None = None  # shards.models.language.LanguageId
    decode_short: int = 448  # images are decoded within this short side (and twice it, long)
    workers: int = 2  # decoding threads
    schema: pa.Schema = field(init=False)

    def __post_init__(self) -> None:
        self.schema = score_schema(self.names)

    @classmethod
    def load(cls, names: list[str], clip_model: str, aesthetic_weights: str | None, aesthetic_head=None, **kw) -> "Scorers":
        """Load what `names` need; `aesthetic_head` (a fitted AestheticMLP) wins over weights."""
        from shards.models.clip import ClipEmbedder

        s = cls(names, **kw)
        if "clip" in names:
            s.clip = ClipEmbedder(clip_model)
        if "aesthetic" in names:
            from shards.models.aesthetic import load_head

            if aesthetic_head is None and not aesthetic_weights:
                raise UserError("the aesthetic scorer needs --aesthetic-weights FILE_OR_HF_ID or --fit-aesthetic ratings.parquet")
            s.aesthetic = aesthetic_head if aesthetic_head is not None else load_head(aesthetic_weights, s.clip.dim)
        if "nsfw" in names:
            from curate.safety import NsfwDetector

            s.nsfw = NsfwDetector()
        if "lang" in names:
            from shards.models.language import LanguageId

            s.lang = LanguageId()
        return s

    @property
    def needs_image(self) -> bool:
        return any(n in self.names for n in ("image", "clip", "nsfw", "dedup"))


def decode_row(row: dict, scorers: Scorers) -> LoadedImage | str:
    """A row's decoded image, or the reason it could not be read ("" when no scorer needs pixels).
    Safe to run in threads (PIL releases the GIL while decoding)."""
    if not scorers.needs_image:
        return ""
    try:
        return read_image(row, scorers.decode_short, 2 * scorers.decode_short)
    except ImageError as e:
        return str(e)


def decode_ahead(pool, rows: list[dict], scorers: Scorers) -> Callable[[], list[LoadedImage | str]]:
    """Start decoding `rows` in `pool`, one task per worker (few thread hand-offs); returns a
    function that waits for the images, in row order. Without a model (clip, nsfw) the main
    thread has nothing to overlap with (and would fight the decoders for the GIL): rows are then
    decoded inline, when the images are asked for."""
    if not scorers.needs_image:
        return lambda: ["" for _ in rows]
    if scorers.clip is None and scorers.nsfw is None:
        return lambda: [decode_row(r, scorers) for r in rows]
    step = -(-len(rows) // max(1, scorers.workers))
    futures = [pool.submit(lambda chunk: [decode_row(r, scorers) for r in chunk], rows[i : i + step]) for i in range(0, len(rows), step)]
    return lambda: [image for f in futures for image in f.result()]


def score_batch(rows: list[dict], scorers: Scorers, loaded: list[LoadedImage | str] | None = None) -> list[dict]:
    """Score rows for every chosen scorer; `loaded` (decode_row per row) when decoded ahead."""
    loaded = [decode_row(r, scorers) for r in rows] if loaded is None else loaded
    out = [{"key": r["key"], "error": (l if isinstance(l, str) and l else None)} for r, l in zip(rows, loaded)]
    ok = [i for i, l in enumerate(loaded) if isinstance(l, LoadedImage)]
    images = [loaded[i] for i in ok]
    if "image" in scorers.names:
        from curate.quality import image_stats  # OpenCV: imported by the first batch that needs it

        for i, im in zip(ok, images):
            out[i].update(image_stats(im.data, im.image, im.width, im.height))
    if "dedup" in scorers.names:
        for i, im in zip(ok, images):
            out[i]["content_sha256"] = hashlib.sha256(im.data).hexdigest()
    if scorers.clip is not None:
        _clip_columns(rows, out, ok, images, scorers)
    if scorers.nsfw is not None:
        for i, (s, labels) in zip(ok, scorers.nsfw.score([im.image for im in images])):
            out[i].update(nsfw=s, nsfw_labels=labels)
    if scorers.lang is not None:
        for o, (lang, prob) in zip(out, scorers.lang.classify([caption_text(r) for r in rows])):
            o.update(lang=lang, lang_prob=prob)
    return out


def caption_text(row: dict) -> str | None:
    """The text a row is scored against: its VLM caption, else its alt-text."""
    return row.get("caption") or row.get("alt_text")


def _clip_columns(rows: list[dict], out: list[dict], ok: list[int], images: list[LoadedImage], scorers: Scorers) -> None:
    image_emb = scorers.clip.embed_images([im.image for im in images])
    with_text = [i for i in ok if caption_text(rows[i])]
    text_emb = dict(zip(with_text, scorers.clip.embed_texts([caption_text(rows[i]) for i in with_text])))
    ratings = scorers.aesthetic.predict(image_emb) if scorers.aesthetic is not None else None
    for j, i in enumerate(ok):
        out[i]["clip_image_emb"] = image_emb[j].tolist()
        if i in text_emb:
            out[i]["clip_text_emb"] = text_emb[i].tolist()
            out[i]["clip_score"] = float(np.dot(image_emb[j], text_emb[i]))
        if ratings is not None:
            out[i]["aesthetic"] = float(ratings[j])
