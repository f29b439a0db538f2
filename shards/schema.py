"""Caption-shard schema: defined here once, used by caption (writes), stats and train (read)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable

import pyarrow as pa

# 2: `address` added (absolute; tar members by offset) and `source` made absolute. Version-1
# shards stay readable: readers fill the missing column with nulls, and features falls back to
# (source, member) for their rows (shards.images.legacy_address).
# 3: `image_tokens` (vision tokens the image cost) and `caption_dense` / `caption_short` (one
# field per extra prompt of `--prompts`) added; version-1 and -2 shards read with them null.
SCHEMA_VERSION = 3

CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # stable, unique per image: resume matches on it
        pa.field("source", pa.string()),  # absolute path or URI of the file, tar or parquet the image came from
        pa.field("member", pa.string()),  # tar member name or parquet row index; null for plain files
        pa.field("address", pa.string()),  # where later jobs read the bytes (shards.images.address)
        pa.field("image_id", pa.int64()),  # SA-1B image_id from the JSON sidecar, when present
        pa.field("width", pa.int32()),  # original image size (before any resize)
        pa.field("height", pa.int32()),
        pa.field("alt_text", pa.string()),  # source alt-text (LAION-style), when present
        pa.field("caption", pa.string()),  # the VLM caption; null when `error` is set
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("backend", pa.string()),  # "vllm" or "transformers"
        pa.field("temperature", pa.float32()),
        pa.field("max_new_tokens", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("num_tokens", pa.int32()),  # generated tokens
        pa.field("image_tokens", pa.int32()),  # the image's placeholder tokens in the prompt (vision tokens)
        pa.field("finish_reason", pa.string()),  # "stop" | "length"
        pa.field("truncated", pa.bool_()),  # hit max_new_tokens
        pa.field("degenerate", pa.bool_()),  # a repetition loop was detected
        pa.field("error", pa.string()),  # why the image could not be read/captioned; null if fine
        pa.field("image", pa.binary()),  # original encoded bytes, only with --embed-images
        # --prompts dense,short: `caption` holds the first prompt's caption, caption_<name> each other's
        pa.field("caption_dense", pa.string()),
        pa.field("caption_short", pa.string()),
    ],
    metadata={b"t2i_data.schema": b"caption", b"t2i_data.schema_version": str(SCHEMA_VERSION).encode()},
)


@dataclass
class CaptionRow:
    """One image's row. Field names and order match CAPTION_SCHEMA."""

    key: str
    source: str | None = None
    member: str | None = None
    address: str | None = None
    image_id: int | None = None
    width: int | None = None
    height: int | None = None
    alt_text: str | None = None
    caption: str | None = None
    model: str | None = None
    prompt: str | None = None
    backend: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    num_tokens: int | None = None
    image_tokens: int | None = None
    finish_reason: str | None = None
    truncated: bool | None = None
    degenerate: bool | None = None
    error: str | None = None
    image: bytes | None = None
    caption_dense: str | None = None
    caption_short: str | None = None


assert [f.name for f in fields(CaptionRow)] == CAPTION_SCHEMA.names, "CaptionRow and CAPTION_SCHEMA drifted"


def rows_to_table(rows: Iterable[CaptionRow | dict[str, Any]], schema: pa.Schema = CAPTION_SCHEMA) -> pa.Table:
    """Build a table in `schema` from CaptionRow objects or dicts (missing keys become null)."""
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        d = asdict(row) if isinstance(row, CaptionRow) else row
        for name in schema.names:
            cols[name].append(d.get(name))
    return pa.table(cols, schema=schema)


def empty_caption_table() -> pa.Table:
    """A zero-row table in the caption schema."""
    return CAPTION_SCHEMA.empty_table()
