"""Resolve `t2i-data stats` dataset arguments (`name=path`: a file, a glob, a folder of caption
files, a caption-shard directory, or a URI) into CaptionSources (dataset_stats.readers)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

from dataset_stats.readers import SUPPORTED, CaptionSource, detect_format, format_of
from shards import fs as shard_fs
from shards.errors import UserError
from shards.layout import MANIFEST, SHARD_RE
from shards.reader import complete_shards


def parse_dataset_arg(arg: str) -> tuple[Optional[str], str]:
    """Split `name=path` into (name, path); a plain path gives (None, path)."""
    name, sep, path = arg.partition("=")
    if sep and name and "/" not in name and not Path(arg).exists():
        return name, path
    return None, arg


def resolve_source(arg: str, column: Optional[str] = None, skip_bad_lines: bool = False) -> CaptionSource:
    """Turn one command-line dataset argument into a CaptionSource (files sorted, checked)."""
    name, path_text = parse_dataset_arg(arg)
    location = shard_fs.as_location(path_text)
    if isinstance(location, str):
        source = _resolve_remote(name, location, column)
        source.skip_bad_lines = skip_bad_lines
        return source
    path_text = str(location) if shard_fs.is_uri(path_text) else path_text  # file:// -> its path
    if any(ch in path_text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path_text, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"no files match {path_text!r}: check the pattern (quote it so the shell does not expand it)")
        default_name = path_text
    else:
        path = Path(path_text)
        if not path.exists():
            raise UserError(f"no such file or directory: {path_text}: check the path")
        files = _files_in_dir(path) if path.is_dir() else [path]
        default_name = path.name if path.is_dir() else path.stem
        if path.is_dir() and _is_shard_dir(path) and column is None:
            column = "caption"
    for f in files:
        detect_format(f)  # fail early on an unknown format
    return CaptionSource(name=name or default_name, files=files, column=column, skip_bad_lines=skip_bad_lines)


def _resolve_remote(name: Optional[str], uri: str, column: Optional[str]) -> CaptionSource:
    """A URI (s3://, gs://, fsspec): one file, a folder of caption files, or a shard directory."""
    if any(ch in uri for ch in "*?["):
        raise UserError(f"{uri}: glob patterns are not supported in URIs: pass the folder URI or one file")
    if shard_fs.is_dir(uri):
        files = _files_in_dir(uri)
        if _is_shard_dir(uri) and column is None:
            column = "caption"
        default_name = shard_fs.basename(uri)
    elif shard_fs.exists(uri):
        files = [uri]
        default_name = Path(shard_fs.basename(uri)).stem
    else:
        raise UserError(f"no such file or directory: {uri}: check the URI")
    for f in files:
        detect_format(f)
    return CaptionSource(name=name or default_name, files=files, column=column)


def _is_shard_dir(path: shard_fs.Location) -> bool:
    names = shard_fs.list_names(path)
    return MANIFEST in names or any(SHARD_RE.match(n) for n in names)


def _files_in_dir(path: shard_fs.Location) -> list[shard_fs.Location]:
    """A `shards/` output dir gives its complete shards only; any other dir its supported files."""
    if _is_shard_dir(path):
        shards = complete_shards(path)
        if not shards:
            raise UserError(f"no complete shards in {path} (no .done markers): let `t2i-data caption` finish or rerun it")
        return shards
    names = shard_fs.list_names(path, files_only=True)
    files = [shard_fs.join(path, n) for n in sorted(names) if format_of(n) is not None]
    if not files:
        raise UserError(f"no caption files in directory {path}: it needs files ending in {SUPPORTED}")
    return files
