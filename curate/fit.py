"""Heads fitted on the user's own labelled images before scoring: the aesthetic head
(`--fit-aesthetic ratings.parquet`: key, rating) and the watermark head (`--fit-watermark
labels.parquet`: key, label). Both read the labelled rows' images from the caption shards,
embed them with the run's CLIP and save the head into the score directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from shards import fs
from shards.errors import UserError
from shards.reader import Shard, iter_batches

if TYPE_CHECKING:
    from curate.api import ScoreConfig

INPUT_COLUMNS = ("key", "address", "source", "member", "caption", "alt_text", "image", "caption_dense", "caption_short")


def input_batches(shards: list[Shard], batch_size: int) -> Iterator[list[dict]]:
    """The caption rows `score` reads (what the scorers need of them), as lists of dicts."""
    for batch in iter_batches(shards, INPUT_COLUMNS, batch_size):
        yield batch.to_pylist()


def labelled_embeddings(cfg: ScoreConfig, shards: list[Shard], path: str | Path, column: str, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP image embeddings, labels) of the rows of `shards` whose keys the Parquet file at
    `path` labels in `column`; one-line errors for a missing file, column or too few rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.scorers import Scorers, decode_row
    from shards.models.clip import ClipEmbedder

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} not found: pass a Parquet file with columns key and {column}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{flag} {path} is not a readable Parquet file ({str(e).splitlines()[0]}): pass a Parquet "
                        f"file with columns key and {column}") from None
    if not {"key", column} <= set(table.schema.names):
        raise UserError(f"{flag} {path} has columns {', '.join(table.schema.names)}: it needs key and {column}")
    kind = table.schema.field(column).type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise UserError(f"{flag} {path}: its {column} column holds {kind}: write {column}s as numbers")
    wanted = {k: v for k, v in zip(table.column("key").to_pylist(), table.column(column).to_pylist()) if v is not None}
    clip = ClipEmbedder(cfg.clip_model)
    probe = Scorers(["image"], decode_short=cfg.decode_short)
    embs, values = [], []
    for rows in input_batches(shards, cfg.batch_size):
        rated = [r for r in rows if r["key"] in wanted]
        loaded = [(r, decode_row(r, probe)) for r in rated]
        ok = [(r, l) for r, l in loaded if not isinstance(l, str)]
        if ok:
            embs.append(clip.embed_images([l.image for _, l in ok]))
            values.extend(float(wanted[r["key"]]) for r, _ in ok)
    if len(values) < 2:
        raise UserError(f"{flag} {path}: only {len(values)} of its keys are readable rows of {cfg.shards}: label images of these shards")
    return np.concatenate(embs), np.asarray(values)


def fit_aesthetic(cfg: ScoreConfig, shards: list[Shard]):
    """Fit the aesthetic head on `cfg.fit_aesthetic` (key, rating) and save it as OUT/aesthetic-head.safetensors."""
    from shards.models.aesthetic import fit_head, save_head

    embs, ratings = labelled_embeddings(cfg, shards, cfg.fit_aesthetic, "rating", "--fit-aesthetic")
    head = fit_head(embs, ratings)
    save_head(head, fs.join(fs.as_location(cfg.out), "aesthetic-head.safetensors"))
    return head


def fit_watermark(cfg: ScoreConfig, shards: list[Shard]):
    """Fit the watermark head on `cfg.fit_watermark` (key, label: 1 watermarked, 0 clean) and
    save it as OUT/watermark-head.safetensors."""
    from curate.watermark import HEAD_FILE, fit_watermark_head, save_watermark_head

    embs, labels = labelled_embeddings(cfg, shards, cfg.fit_watermark, "label", "--fit-watermark")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise UserError(f"--fit-watermark {cfg.fit_watermark}: labels must be 0 (clean) or 1 (watermarked)")
    head = fit_watermark_head(embs, labels)
    save_watermark_head(head, fs.join(fs.as_location(cfg.out), HEAD_FILE))
    return head
