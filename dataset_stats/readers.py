"""Caption sources (dataset_stats.sources resolves `name=path` arguments into them): detect
formats and the caption column, and stream captions in batches (never the whole dataset in memory, except a plain `.json` file,
which JSON cannot stream).

Every problem with the input becomes a one-line `UserError` naming the fix; `validate` finds
them before any tagging (line formats are read through once), and with `skip_bad_lines` a
malformed line is counted and skipped instead. JSON/JSONL/CSV/TSV/TXT may be compressed (`.gz`,
`.zst`: pyarrow's codecs). Files and shard directories may be local paths or URIs (s3://, gs://,
any fsspec scheme), read through shards.fs; glob patterns are local only.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from shards import fs as shard_fs
from shards.errors import UserError

# Column names tried in this order (first exact, then case-insensitive): ours, LAION, others.
CAPTION_COLUMNS = ("caption", "TEXT", "text", "prompt", "captions", "alt_text", "description", "sentence", "raw")

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # JSON/JSONL/CSV/TSV/TXT may be compressed
SUPPORTED = ", ".join(sorted(FORMATS)) + " (text formats also as .gz or .zst)"

Batch = list[Optional[str]]


@dataclass
class CaptionSource:
    """One dataset to analyse: a label, its files, and the caption column (None: detect)."""

    name: str
    files: list[shard_fs.Location]  # local Paths, or URI strings (shards.fs)
    column: Optional[str] = None
    skip_bad_lines: bool = False  # count and skip malformed lines instead of failing
    # Filled by `validate` (rows of every file; line formats are read through once).
    checked_rows: Optional[int] = None
    # Filled while reading: facts some formats know (COCO: number of images).
    extra: dict[str, Any] = field(default_factory=dict)

    def known_rows(self) -> Optional[int]:
        """Row count from file metadata when every file is Parquet, or once `validate` has read
        the files, else None (unknown up front)."""
        if self.checked_rows is not None:
            return self.checked_rows
        if not all(detect_format(f) == "parquet" for f in self.files):
            return None
        return sum(_parquet_file(f).metadata.num_rows for f in self.files)


def compression(path: shard_fs.Location) -> Optional[str]:
    """"gzip" or "zstd" for a compressed file (from its last extension), else None."""
    return COMPRESSIONS.get(Path(shard_fs.basename(path)).suffix.lower())


def format_of(name: str) -> Optional[str]:
    """The format of a file name, looking through a .gz/.zst extension; None if unsupported."""
    stem = Path(name)
    if stem.suffix.lower() in COMPRESSIONS:
        stem = stem.with_suffix("")
        if FORMATS.get(stem.suffix.lower()) == "parquet":
            return None  # Parquet compresses its pages itself
    return FORMATS.get(stem.suffix.lower())


def detect_format(path: shard_fs.Location) -> str:
    """The reader for `path` (a Path or a URI), from its extension (`.jsonl.gz`: jsonl)."""
    name = shard_fs.basename(path)
    fmt = format_of(name)
    if fmt is None:
        suffix = "".join(Path(name).suffixes[-2:]) if compression(path) else Path(name).suffix
        raise UserError(f"unknown format for {path} (extension {suffix or 'none'!r}): use one of {SUPPORTED}")
    return fmt


def pick_column(available: list[str], wanted: Optional[str], where: str) -> str:
    """The caption column: `wanted` if given, else the first known caption name present."""
    if wanted is not None:
        if wanted in available:
            return wanted
        raise UserError(f"{where} has no column {wanted!r}; columns are: {', '.join(map(str, available)) or 'none'}: pass one with --column")
    for name in CAPTION_COLUMNS:
        if name in available:
            return name
    lowered = {str(c).lower(): c for c in available}
    for name in CAPTION_COLUMNS:
        if name.lower() in lowered:
            return lowered[name.lower()]
    raise UserError(
        f"{where}: no caption column found (tried {', '.join(CAPTION_COLUMNS)}); columns are: "
        f"{', '.join(map(str, available)) or 'none'}: pass one with --column"
    )


# ---------------------------------------------------------------------------------------------
# streaming


def iter_caption_batches(source: CaptionSource, batch_rows: int = 1024) -> Iterator[Batch]:
    """Stream the captions of every file of `source` as lists of str or None (null captions).
    Malformed lines raise a UserError, or with `source.skip_bad_lines` are counted in
    `source.extra["bad_lines"]` and skipped."""
    for path in source.files:
        fmt = detect_format(path)
        reader = _READERS[fmt]
        try:
            yield from reader(path, source, batch_rows)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
        except (pa.ArrowException, OSError, EOFError) as e:
            if fmt == "parquet" or compression(path) is None:
                raise
            raise UserError(f"{path} is a damaged {compression(path)} file ({str(e).splitlines()[0]}): re-compress or re-download it") from None


def _non_string(path: shard_fs.Location, column: str, row: int, value: Any) -> UserError:
    return UserError(
        f"{path}: column {column!r} holds a non-string value {value!r} ({type(value).__name__}) at row {row}: "
        f"point --column at the text column"
    )


def _parquet_file(path: shard_fs.Location) -> pq.ParquetFile:
    try:
        return shard_fs.parquet_file(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}): re-export or re-download it") from None


def parquet_column(path: shard_fs.Location, source: CaptionSource) -> str:
    """Resolve and type-check the caption column of one Parquet file."""
    schema = _parquet_file(path).schema_arrow
    column = pick_column(schema.names, source.column, str(path))
    source.extra.setdefault("column", column)
    typ = schema.field(column).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ) or typ == pa.string_view()):
        raise UserError(f"{path}: column {column!r} has type {typ}, not text: point --column at the text column")
    return column


def _read_parquet(path: shard_fs.Location, source: CaptionSource, batch_rows: int) -> Iterator[Batch]:
    column = parquet_column(path, source)
    try:
        for rb in _parquet_file(path).iter_batches(batch_size=batch_rows, columns=[column]):
            yield rb.column(0).cast(pa.string()).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is damaged and could not be read ({str(e).splitlines()[0]}): re-export or re-download it") from None


def _check(values: list[Any], path: shard_fs.Location, column: str, first_row: int) -> Batch:
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise _non_string(path, column, first_row + i, v)
    return values


def _open_binary(path: shard_fs.Location) -> io.BufferedReader:
    """`path` as a binary stream, decompressed when it ends in .gz or .zst (pyarrow's codecs)."""
    if isinstance(path, Path):
        return io.BufferedReader(pa.input_stream(str(path), compression="detect"))
    return io.BufferedReader(shard_fs.open_input(path))  # pyarrow detects the codec from the name


def _open_text(path: shard_fs.Location, newline: Optional[str] = None) -> io.TextIOWrapper:
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8", newline=newline)


def _bad_line(source: CaptionSource, where: str, problem: str) -> None:
    """A malformed line: an error, or with --skip-bad-lines counted and skipped."""
    if not source.skip_bad_lines:
        raise UserError(f"{where} {problem}: fix or drop that line, or pass --skip-bad-lines to skip such lines")
    source.extra["bad_lines"] = source.extra.get("bad_lines", 0) + 1


def _jsonl_value(line: bytes, path: shard_fs.Location, lineno: int, source: CaptionSource, column: Optional[str]) -> tuple[Any, Optional[str]]:
    """(caption, column) of one JSONL line; caption _BAD for a malformed line."""
    try:
        rec = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        _bad_line(source, f"{path}:{lineno}", f"is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})")
        return _BAD, column
    if isinstance(rec, dict):
        if column is None:
            column = pick_column(list(rec), source.column, f"{path} (first record)")
            source.extra.setdefault("column", column)
        rec = rec.get(column)
    if rec is not None and not isinstance(rec, str):
        _bad_line(source, f"{path}:{lineno}", f"holds a non-string value {rec!r} ({type(rec).__name__}) in column {column or 'line'!r}")
        return _BAD, column
    return rec, column


_BAD = object()  # a skipped malformed line


def _read_jsonl(path: shard_fs.Location, source: CaptionSource, batch_rows: int) -> Iterator[Batch]:
    column: Optional[str] = None
    batch: Batch = []
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            value, column = _jsonl_value(line, path, lineno, source, column)
            if value is _BAD:
                continue
            batch.append(value)
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


def _read_json(path: shard_fs.Location, source: CaptionSource, batch_rows: int) -> Iterator[Batch]:
    """A JSON file: COCO (`annotations[].caption`), a list of records, or a list of strings."""
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file or use .jsonl") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: convert it to UTF-8") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        records = data["annotations"]
        image_ids = {r.get("image_id") for r in records if isinstance(r, dict) and "image_id" in r}
        if image_ids:
            source.extra["images"] = source.extra.get("images", 0) + len(image_ids)
    elif isinstance(data, list):
        records = data
    else:
        raise UserError(f"{path}: expected a COCO file (with 'annotations') or a JSON list of captions or records: convert it")
    column = None
    if records and isinstance(records[0], dict):
        column = pick_column(list(records[0]), source.column, f"{path} (first record)")
        source.extra.setdefault("column", column)
    for start in range(0, len(records), batch_rows):
        chunk = records[start : start + batch_rows]
        values = [r.get(column) if isinstance(r, dict) else r for r in chunk]
        yield _check(values, path, column or "item", start)


def _read_delimited(path: shard_fs.Location, source: CaptionSource, batch_rows: int, delimiter: str) -> Iterator[Batch]:
    """CSV/TSV with a header row; a row whose field count differs from the header's is malformed
    (an unquoted delimiter inside a caption, a truncated line)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long VLM captions exceed the 128 KiB default
    with _open_text(path, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return  # empty file: no rows
        column = pick_column(header, source.column, str(path))
        source.extra.setdefault("column", column)
        index = header.index(column)
        batch: Batch = []
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:
                _bad_line(source, f"{path}:{reader.line_num}", f"is not valid {delimiter!r}-separated text ({e})")
                continue
            if row is None:
                break
            if len(row) != len(header):
                _bad_line(source, f"{path}:{reader.line_num}", f"has {len(row)} fields, the header {len(header)}")
                continue
            batch.append(row[index])
            if len(batch) >= batch_rows:
                yield batch
                batch = []
        if batch:
            yield batch


def _read_text(path: shard_fs.Location, source: CaptionSource, batch_rows: int) -> Iterator[Batch]:
    """One caption per line; a blank line is an empty caption (counted, not analysed); a line
    that is not UTF-8 is malformed."""
    batch: Batch = []
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                batch.append(line.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                _bad_line(source, f"{path}:{lineno}", "is not UTF-8 text")
                continue
            if len(batch) >= batch_rows:
                yield batch
                batch = []
    if batch:
        yield batch


_READERS = {
    "parquet": _read_parquet,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": lambda p, s, n: _read_delimited(p, s, n, ","),
    "tsv": lambda p, s, n: _read_delimited(p, s, n, "\t"),
    "text": _read_text,
}


def validate(source: CaptionSource) -> None:
    """Open and check every file before any tagging: Parquet through its footer (readable, column
    present and text); the other formats by reading them through once (every line parsed, so a
    malformed line fails here, not hours into tagging; rows are counted for the progress bar).
    Nothing is kept in memory; bad lines counted here are counted again by the real pass."""
    for path in source.files:
        if detect_format(path) == "parquet":
            parquet_column(path, source)
    if not all(detect_format(f) == "parquet" for f in source.files):
        probe = replace(source, extra=dict(source.extra))  # counts of this pass are thrown away
        source.checked_rows = sum(len(b) for b in iter_caption_batches(probe, batch_rows=4096))
        if probe.extra.get("column") is not None:
            source.extra.setdefault("column", probe.extra["column"])
    rows = source.known_rows()
    if rows == 0:
        raise UserError(f"dataset {source.name!r} is empty (0 rows in {len(source.files)} file(s)): point it at files with captions")
