"""The scorers and the per-batch scoring function both engines call.

`Scorers.load(names, ...)` loads the models once; `score_batch(rows, scorers)` turns a batch of
caption rows (dicts with key, source, member, image, caption, alt_text) into score rows in
`scorers.schema`. An unreadable image or a missing source gives a row with `error` set (its
text scores are still filled); it never stops the batch. `scorers.seconds` adds up the time each
scorer took (the CLIP image embedding counts as `clip`, which aesthetic, watermark, captions and
dedup reuse), for the run's ledger.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from shards.images import ImageError
from shards.errors import UserError
from shards.schema import CAPTION_SCHEMA
from curate.images import LoadedImage, read_image

SCORERS = ("clip", "aesthetic", "dedup", "nsfw", "lang", "image", "watermark", "text", "phash", "captions")
NEEDS_CLIP = ("clip", "aesthetic", "dedup", "watermark", "captions")  # they reuse the CLIP image embedding
NEEDS_PIXELS = ("image", "clip", "nsfw", "dedup", "text", "phash")
# every caption-shard text field: `captions` scores each (caption, caption_<prompt>, alt_text)
CAPTION_TEXT_FIELDS = tuple(n for n in CAPTION_SCHEMA.names if n == "caption" or n.startswith("caption_")) + ("alt_text",)
TEXT_DETECTOR_NEEDED = ("the text scorer needs --text-detector FILE_DIR_OR_HF_ID (a curate.text detector; "
                        "the demo world's: python -m tiny.text_detector OUT.safetensors)")

_COLUMNS: dict[str, list[pa.Field]] = {
    "image": [pa.field("width", pa.int32()), pa.field("height", pa.int32()), pa.field("aspect", pa.float32()),
              pa.field("blur", pa.float32()), pa.field("jpeg_quality", pa.int32()), pa.field("file_bytes", pa.int64())],
    "clip": [pa.field("clip_score", pa.float32()), pa.field("clip_image_emb", pa.list_(pa.float32())),
             pa.field("clip_text_emb", pa.list_(pa.float32()))],
    "aesthetic": [pa.field("aesthetic", pa.float32())],
    "dedup": [pa.field("content_sha256", pa.string())],
    "nsfw": [pa.field("nsfw", pa.float32()), pa.field("nsfw_labels", pa.string())],
    "lang": [pa.field("lang", pa.string()), pa.field("lang_prob", pa.float32())],
    "watermark": [pa.field("watermark", pa.float32())],
    "text": [pa.field("text_coverage", pa.float32()), pa.field("has_text", pa.bool_()), pa.field("text", pa.string())],
    "phash": [pa.field("phash", pa.uint64())],
    "captions": [pa.field(f"clip_score_{f}", pa.float32()) for f in CAPTION_TEXT_FIELDS],
}  # fmt: skip


@dataclass(frozen=True)
class ModelRefs:
    """Where the later scorers' models come from (hashable: the Ray engine keeps loaded scorers
    per process by it). watermark: the watermark head's file or HF id; text_*: the text
    detector (file, folder or HF id), the optional recogniser (HF id or folder), the cell
    probability threshold and the coverage from which an image has text (curate.text)."""

    watermark: str | None = None
    text_detector: str | None = None
    text_recognizer: str | None = None
    text_threshold: float = 0.5
    text_min_coverage: float = 0.01


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
    watermark: object | None = None  # curate.watermark.WatermarkHead
    text: object | None = None  # curate.text.TextReader
    decode_short: int = 448  # images are decoded within this short side (and twice it, long)
    workers: int = 2  # decoding threads
    schema: pa.Schema = field(init=False)
    seconds: dict[str, float] = field(init=False)  # time spent per scorer, summed over batches

    def __post_init__(self) -> None:
        self.schema = score_schema(self.names)
        self.seconds = {}

    @classmethod
    def load(cls, names: list[str], clip_model: str, aesthetic_weights: str | None, aesthetic_head=None,
             refs: ModelRefs = ModelRefs(), watermark_head=None, **kw) -> "Scorers":
        """Load what `names` need; a fitted head (`aesthetic_head`, `watermark_head`) wins over weights."""
        from shards.models.clip import ClipEmbedder

        s = cls(names, **kw)
        if "clip" in names:
            s.clip = ClipEmbedder(clip_model)
        if "aesthetic" in names:
            from shards.models.aesthetic import load_head

            if aesthetic_head is None and not aesthetic_weights:
                raise UserError("the aesthetic scorer needs --aesthetic-weights FILE_OR_HF_ID or --fit-aesthetic ratings.parquet")
            s.aesthetic = aesthetic_head if aesthetic_head is not None else load_head(aesthetic_weights, s.clip.dim)
        s._load_new(refs, watermark_head)
        if "nsfw" in names:
            from curate.safety import NsfwDetector

            s.nsfw = NsfwDetector()
        if "lang" in names:
            from shards.models.language import LanguageId

            s.lang = LanguageId()
        return s

    def _load_new(self, refs: ModelRefs, watermark_head) -> None:
        """The watermark head and the text detector, when chosen."""
        if "watermark" in self.names:
            from curate.watermark import load_watermark_head

            if watermark_head is None and not refs.watermark:
                raise UserError("the watermark scorer needs --watermark-weights FILE_OR_HF_ID or --fit-watermark labels.parquet")
            self.watermark = watermark_head if watermark_head is not None else load_watermark_head(refs.watermark, self.clip.dim)
        if "text" in self.names:
            from curate.text import TextReader

            if not refs.text_detector:
                raise UserError(TEXT_DETECTOR_NEEDED)
            self.text = TextReader(refs.text_detector, refs.text_recognizer, refs.text_threshold, refs.text_min_coverage)

    @property
    def needs_image(self) -> bool:
        return any(n in self.names for n in NEEDS_PIXELS)

    def timed(self, name: str, since: float) -> float:
        """Add the time since `since` to scorer `name`; returns now."""
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


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
    if scorers.clip is None and scorers.nsfw is None and scorers.text is None:
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
    t = time.perf_counter()
    if "image" in scorers.names:
        from curate.quality import image_stats  # OpenCV: imported by the first batch that needs it

        for i, im in zip(ok, images):
            out[i].update(image_stats(im.data, im.image, im.width, im.height))
        t = scorers.timed("image", t)
    if "dedup" in scorers.names:
        for i, im in zip(ok, images):
            out[i]["content_sha256"] = hashlib.sha256(im.data).hexdigest()
        t = scorers.timed("dedup", t)
    if "phash" in scorers.names:
        from curate.phash import phashes

        for i, h in zip(ok, phashes([im.image for im in images]).tolist()):
            out[i]["phash"] = h
        t = scorers.timed("phash", t)
    if scorers.clip is not None:
        t = _clip_columns(rows, out, ok, images, scorers, t)
    if scorers.nsfw is not None:
        for i, (s, labels) in zip(ok, scorers.nsfw.score([im.image for im in images])):
            out[i].update(nsfw=s, nsfw_labels=labels)
        t = scorers.timed("nsfw", t)
    if scorers.text is not None:
        for i, found in zip(ok, scorers.text.read([im.image for im in images])):
            out[i].update(text_coverage=found.coverage, has_text=found.has_text, text=found.text)
        t = scorers.timed("text", t)
    if scorers.lang is not None:
        for o, (lang, prob) in zip(out, scorers.lang.classify([caption_text(r) for r in rows])):
            o.update(lang=lang, lang_prob=prob)
        scorers.timed("lang", t)
    return out


def caption_text(row: dict) -> str | None:
    """The text a row is scored against: its VLM caption, else its alt-text."""
    return row.get("caption") or row.get("alt_text")


def _clip_columns(rows: list[dict], out: list[dict], ok: list[int], images: list[LoadedImage], scorers: Scorers, t: float) -> float:
    """clip (and the heads on its image embedding: aesthetic, watermark; and captions)."""
    image_emb = scorers.clip.embed_images([im.image for im in images])
    with_text = [i for i in ok if caption_text(rows[i])]
    text_emb = dict(zip(with_text, scorers.clip.embed_texts([caption_text(rows[i]) for i in with_text])))
    for j, i in enumerate(ok):
        out[i]["clip_image_emb"] = image_emb[j].tolist()
        if i in text_emb:
            out[i]["clip_text_emb"] = text_emb[i].tolist()
            out[i]["clip_score"] = float(np.dot(image_emb[j], text_emb[i]))
    t = scorers.timed("clip", t)
    for name, head, column in (("aesthetic", scorers.aesthetic, "aesthetic"), ("watermark", scorers.watermark, "watermark")):
        if head is not None:
            for i, v in zip(ok, head.predict(image_emb).tolist()):
                out[i][column] = v
            t = scorers.timed(name, t)
    if "captions" in scorers.names:
        _caption_scores(rows, out, ok, image_emb, scorers)
        t = scorers.timed("captions", t)
    return t


def _caption_scores(rows: list[dict], out: list[dict], ok: list[int], image_emb: np.ndarray, scorers: Scorers) -> None:
    """clip_score_<field> of every caption field a row has: the mean cosine of the image with the
    field's overlapping token windows (shards.models.clip.ClipEmbedder.window_scores)."""
    pairs = [(j, i, f) for j, i in enumerate(ok) for f in CAPTION_TEXT_FIELDS if rows[i].get(f)]
    scores = scorers.clip.window_scores(image_emb[[j for j, _, _ in pairs]], [rows[i][f] for _, i, f in pairs])
    for (_, i, f), v in zip(pairs, scores.tolist()):
        out[i][f"clip_score_{f}"] = v
