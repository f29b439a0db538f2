"""Where shard directories live: local paths, or object-store / fsspec URIs, behind one small API.

    resolve("s3://bucket/captions")   -> (pyarrow.fs.S3FileSystem, "bucket/captions")
    resolve("memory://bucket/x")      -> (PyFileSystem(FSSpecHandler(memory)), "/bucket/x")
    resolve("out/")                   -> (LocalFileSystem, "/abs/path/out")

Local paths (and `file://` URIs, which become local paths) keep the exact local behaviour of the
writer: temp file, fsync, `os.replace`, then the done-marker. Everything else goes through
pyarrow's filesystems: the ones pyarrow knows itself (`s3://`, `gs://`, `hdfs://`, `abfs://`;
credentials from the usual environment: AWS_*, GOOGLE_APPLICATION_CREDENTIALS, instance roles),
and any other scheme fsspec knows, wrapped with `pyarrow.fs.FSSpecHandler` (`memory://` in
tests; `az://`, `sftp://`, ... when the fsspec backend is installed).

Helpers take `str | Path` and return a `Path` for local locations and a URI string for remote
ones, so existing `Path`-based callers keep working.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shards.errors import UserError

Location = Path | str  # a local Path, or a remote URI string

_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: "C:/x" is a path
_PROCESS_LOCAL = {"memory"}  # fsspec filesystems that live inside one process
_CREDENTIALS_HINT = "check the URI and the credentials in the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...)"


def is_uri(p: str | Path) -> bool:
    """True for `scheme://...` (s3://, gs://, memory://, file://, ...); False for paths, `C:/x` included."""
    return isinstance(p, str) and _URI_RE.match(p) is not None


def scheme(p: str | Path) -> str | None:
    """The URI scheme, lower-cased, or None for a local path."""
    m = _URI_RE.match(p) if isinstance(p, str) else None
    return m["scheme"].lower() if m else None


def as_location(p: str | Path) -> Location:
    """`Path` for local paths and `file://` URIs, the URI string (no trailing slash) otherwise."""
    if isinstance(p, Path) or not is_uri(p):
        return Path(p)
    if scheme(p) == "file":
        u = urlparse(p)
        if u.netloc not in ("", "localhost"):
            raise UserError(f"{p}: file:// URIs name a local path (file:///abs/path): pass the path itself")
        return Path(unquote(u.path))
    if "?" in p:
        raise UserError(f"{p}: options in the URI are not supported for shard directories: set them in the environment (e.g. AWS_ENDPOINT_URL, AWS_REGION)")
    return p.rstrip("/") if not p.endswith("://") else p


def is_process_local(p: str | Path) -> bool:
    """A filesystem other processes (Ray workers, subprocesses) cannot see, e.g. `memory://`."""
    return scheme(p) in _PROCESS_LOCAL


class _OpenError(Exception):
    """Why a filesystem could not be opened; resolve() names the URI in front of it."""


@functools.lru_cache(maxsize=None)
def _remote_filesystem(scheme_: str, authority: str) -> tuple[pafs.FileSystem, str | None]:
    """(filesystem, path prefix) for one bucket/host; built once (an S3 client resolves its region).
    The prefix is None for fsspec filesystems, whose own `_strip_protocol` maps URIs to paths."""
    try:
        fs, prefix = pafs.FileSystem.from_uri(f"{scheme_}://{authority}/")
        return fs, prefix.rstrip("/")
    except pa.ArrowInvalid as e:
        if "Unrecognized filesystem type" not in str(e):
            raise _OpenError(f"cannot open it ({_first_line(e)}): {_CREDENTIALS_HINT}") from None
    except (OSError, ValueError) as e:
        raise _OpenError(f"cannot open it ({_first_line(e)}): {_CREDENTIALS_HINT}") from None
    import fsspec  # pyarrow does not know the scheme: maybe an fsspec backend does

    try:
        fsspec.get_filesystem_class(scheme_)
    except ValueError:
        raise _OpenError(
            f"unknown filesystem scheme {scheme_!r} (neither pyarrow nor fsspec knows it): "
            "pass a local path or an s3://, gs:// or other fsspec URI"
        ) from None
    except ImportError as e:
        raise _OpenError(f"the {scheme_}:// filesystem needs a package that is not installed ({_first_line(e)}): install it") from None
    try:
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme_))), None
    except Exception as e:  # noqa: BLE001 - any backend's setup error becomes one line
        raise _OpenError(f"cannot open it ({_first_line(e)}): {_CREDENTIALS_HINT}") from None


def resolve(p: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `p` and `p`'s path inside it. UserError (one line) for an
    unknown scheme, a missing backend or credentials that do not work."""
    loc = as_location(p)
    if isinstance(loc, Path):
        return pafs.LocalFileSystem(), loc.absolute().as_posix()
    scheme_ = scheme(loc)
    authority, _, inner = loc.split("://", 1)[1].partition("/")
    try:
        fs, prefix = _remote_filesystem(scheme_, authority)
    except _OpenError as e:
        raise UserError(f"{loc}: {e}") from None
    if prefix is None:
        import fsspec

        return fs, fsspec.get_filesystem_class(scheme_)._strip_protocol(loc)
    return fs, (f"{prefix}/{inner}".rstrip("/") or "/")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- paths -----------------------------------------------------------------------------------


def join(base: str | Path, *names: str) -> Location:
    """`base/name/...`: a Path for local bases, a URI string for remote ones."""
    loc = as_location(base)
    if isinstance(loc, Path):
        return loc.joinpath(*names)
    return "/".join([loc.rstrip("/"), *names])


def basename(p: str | Path) -> str:
    return p.name if isinstance(p, Path) else str(p).rstrip("/").rsplit("/", 1)[-1]


def with_suffix_name(p: str | Path, suffix: str) -> Location:
    """`p` with `suffix` appended to its name (`part-00000.parquet` -> `part-00000.parquet.done`)."""
    loc = as_location(p)
    return loc.with_name(loc.name + suffix) if isinstance(loc, Path) else loc + suffix


# --- queries ---------------------------------------------------------------------------------


def _info(p: str | Path) -> pafs.FileInfo:
    fs, path = resolve(p)
    try:
        return fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:  # denied, bucket missing, network
        raise UserError(f"cannot read {p} ({_first_line(e)}): {_CREDENTIALS_HINT}") from None


def exists(p: str | Path) -> bool:
    loc = as_location(p)
    return loc.exists() if isinstance(loc, Path) else _info(loc).type != pafs.FileType.NotFound


def is_dir(p: str | Path) -> bool:
    loc = as_location(p)
    return loc.is_dir() if isinstance(loc, Path) else _info(loc).type == pafs.FileType.Directory


def is_file(p: str | Path) -> bool:
    loc = as_location(p)
    return loc.is_file() if isinstance(loc, Path) else _info(loc).type == pafs.FileType.File


def size(p: str | Path) -> int:
    loc = as_location(p)
    return loc.stat().st_size if isinstance(loc, Path) else _info(loc).size


def list_names(directory: str | Path, files_only: bool = False) -> list[str]:
    """Names of the entries directly in `directory` (only files with `files_only`); [] when it
    does not exist (yet)."""
    loc = as_location(directory)
    if isinstance(loc, Path):
        return [p.name for p in loc.iterdir() if not files_only or p.is_file()] if loc.is_dir() else []
    fs, path = resolve(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [i.base_name for i in infos if not files_only or i.type == pafs.FileType.File]
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot list {loc} ({_first_line(e)}): {_CREDENTIALS_HINT}") from None


def makedirs(directory: str | Path) -> None:
    """Create `directory` (and parents). On object stores, where folders are only key prefixes,
    this also checks early that the bucket is reachable with the credentials at hand."""
    loc = as_location(directory)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)
        return
    fs, path = resolve(loc)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise UserError(f"{loc} is a file: pass a directory")
        if info.type == pafs.FileType.NotFound:
            fs.create_dir(path, recursive=True)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot create {loc} ({_first_line(e)}): {_CREDENTIALS_HINT}") from None


# --- reading ---------------------------------------------------------------------------------


def open_input(p: str | Path) -> IO[bytes]:
    """A binary file object for reading `p` (close it, or use `with`)."""
    loc = as_location(p)
    if isinstance(loc, Path):
        return open(loc, "rb")
    fs, path = resolve(loc)
    return fs.open_input_stream(path)


def read_bytes(p: str | Path) -> bytes:
    with open_input(p) as f:
        return f.read()


def read_text(p: str | Path) -> str:
    return read_bytes(p).decode("utf-8")


def sha256(p: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_input(p) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parquet_file(p: str | Path) -> pq.ParquetFile:
    """A Parquet file, local or remote, whose reads verify the page checksums (shards are written
    with them: a flipped bit is an OSError, not wrong rows; files without checksums read as before)."""
    loc = as_location(p)
    if isinstance(loc, Path):
        return pq.ParquetFile(loc, page_checksum_verification=True)
    fs, path = resolve(loc)
    return pq.ParquetFile(path, filesystem=fs, page_checksum_verification=True)


def read_table(p: str | Path, **kwargs) -> pa.Table:
    """`pq.read_table` for a local path or a URI (`columns=`, `schema=` pass through), page
    checksums verified."""
    loc = as_location(p)
    kwargs.setdefault("page_checksum_verification", True)
    if isinstance(loc, Path):
        return pq.read_table(loc, **kwargs)
    fs, path = resolve(loc)
    return pq.read_table(path, filesystem=fs, **kwargs)


def parquet_dataset(paths: list[str | Path]):
    """A pyarrow dataset over Parquet files (a lazy source for polars' scan_pyarrow_dataset) whose
    scans verify page checksums, as parquet_file's reads do."""
    import pyarrow.dataset as ds

    locs = [as_location(p) for p in paths]
    remote = [l for l in locs if not isinstance(l, Path)]
    fs, names = (resolve(remote[0])[0], [resolve(l)[1] for l in locs]) if remote else (None, [str(l) for l in locs])
    fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
    return ds.dataset(names, format=fmt, filesystem=fs)


def read_schema(p: str | Path) -> pa.Schema:
    return parquet_file(p).schema_arrow


# --- writing ---------------------------------------------------------------------------------


def write_bytes(p: str | Path, data: bytes | pa.Buffer) -> None:
    """Write `data` so that `p` is either absent/old or complete: locally a temp file renamed over
    `p`; on an object store one PUT (an object appears whole or not at all)."""
    loc = as_location(p)
    if isinstance(loc, Path):
        tmp = loc.with_name(f".{loc.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, loc)
        return
    fs, path = resolve(loc)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(p: str | Path, text: str) -> None:
    """`text` (UTF-8) written whole or not at all: see write_bytes. The project's one atomic text write."""
    write_bytes(p, text.encode("utf-8"))


def delete(p: str | Path, missing_ok: bool = True) -> None:
    loc = as_location(p)
    if isinstance(loc, Path):
        loc.unlink(missing_ok=missing_ok)
        return
    fs, path = resolve(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
