"""Image sources: folders (recursive, SA-1B JSON sidecars), SA-1B tars (streamed), Parquet.

Every reader yields ImageItem with a key that is stable and unique per image, so a rerun can
skip what is done: `<root name>/<relative path>` for files, `<tar name>/<member>` for tar
members, the `key` column or `<parquet name>/<row>` for Parquet rows.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shards.errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TAR_EXTS = (".tar", ".tar.gz", ".tgz")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes", "bytes")
ALT_COLUMNS = ("alt_text", "caption", "TEXT", "text", "alt", "txt")
TRUNCATED = "#truncated"  # key suffix of the error row of a tar that ended early


@dataclass
class ImageItem:
    """One input image. Either `data` holds its bytes or `path` points at them; `error` is set
    when the source itself rejects the item (unsafe tar member, missing bytes)."""

    key: str
    source: str
    member: str | None = None
    data: bytes | None = None
    path: str | None = None
    alt: str | None = None
    image_id: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            return b""
        return Path(self.path).read_bytes()


def _sidecar_info(raw: bytes | str) -> dict:
    """image_id/width/height from an SA-1B JSON sidecar ({"image": {...}, "annotations": [...]}),
    plus an alt-text when the sidecar carries one (`image.alt_text`; SA-1B itself has none)."""
    try:
        doc = json.loads(raw)
        info = doc.get("image", {})
        out = {k: info.get(k) for k in ("image_id", "width", "height")}
        if isinstance(info.get("alt_text"), str):
            out["alt"] = info["alt_text"]
        elif "image" not in doc and isinstance(doc.get("caption"), str):  # img2dataset's sidecar
            out["alt"] = doc["caption"]
        return out
    except (ValueError, AttributeError):
        return {}


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_EXTS)


def iter_folder(root: Path) -> Iterator[ImageItem]:
    """Images under `root` (sorted, recursive), plus the tars and Parquet files found there."""
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if _is_tar(p):
            yield from iter_tar(p, key_prefix=f"{root.name}/{p.relative_to(root).as_posix()}")
        elif p.suffix == ".parquet":
            if has_image_column(p):  # else metadata next to the images (img2dataset's layout): not a source
                yield from iter_parquet(p, key_prefix=f"{root.name}/{p.relative_to(root).as_posix()}")
        elif p.suffix.lower() in IMAGE_EXTS:
            item = ImageItem(key=f"{root.name}/{p.relative_to(root).as_posix()}", source=str(p), path=str(p))
            sidecar = p.with_suffix(".json")
            if sidecar.is_file():
                for k, v in _sidecar_info(sidecar.read_bytes()).items():
                    setattr(item, k, v)
            yield item


def _unsafe_member(name: str) -> bool:
    pp = PurePosixPath(name)
    return name.startswith(("/", "\\")) or pp.is_absolute() or ".." in pp.parts or ":" in (pp.parts[0] if pp.parts else "")


def iter_tar(path: Path, key_prefix: str | None = None, max_pending: int = 64) -> Iterator[ImageItem]:
    """Stream an (SA-1B) tar without extracting it. `sa_<id>.json` sidecars are matched to their
    image when they are near each other in the archive (SA-1B keeps them adjacent)."""
    prefix = key_prefix or path.name
    pending: dict[str, ImageItem] = {}  # images waiting for their sidecar
    infos: dict[str, dict] = {}  # sidecars seen before their image
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        yield ImageItem(key=prefix, source=str(path), error=f"unreadable tar: {e}")
        return
    with tf:
        try:
            for m in tf:
                name = m.name
                if not m.isfile():
                    continue
                ext = PurePosixPath(name).suffix.lower()
                if _unsafe_member(name):
                    if ext in IMAGE_EXTS:
                        yield ImageItem(key=f"{prefix}/{name}", source=str(path), member=name,
                                        error="unsafe tar member name (absolute or '..'): not read")
                    continue
                stem = str(PurePosixPath(name).with_suffix(""))
                if ext == ".json":
                    info = _sidecar_info(tf.extractfile(m).read())
                    if stem in pending:
                        item = pending.pop(stem)
                        for k, v in info.items():
                            setattr(item, k, v)
                        yield item
                    else:
                        infos[stem] = info
                elif ext in IMAGE_EXTS:
                    item = ImageItem(key=f"{prefix}/{name}", source=str(path), member=name, data=tf.extractfile(m).read())
                    if stem in infos:
                        for k, v in infos.pop(stem).items():
                            setattr(item, k, v)
                        yield item
                    else:
                        pending[stem] = item
                        if len(pending) > max_pending:  # its sidecar is not coming soon: don't hoard memory
                            yield pending.pop(next(iter(pending)))
        except (tarfile.TarError, OSError, EOFError) as e:
            yield ImageItem(key=f"{prefix}{TRUNCATED}", source=str(path), error=f"tar stream ended early: {e}")
    yield from pending.values()


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[w.lower()] for w in wanted if w.lower() in lower), None)


def iter_parquet(path: Path | str, key_prefix: str | None = None, batch_rows: int = 256) -> Iterator[ImageItem]:
    """Rows of a Parquet file with encoded image bytes (img2dataset, HF datasets {bytes, path}).
    `path` may also be a URI (s3://, gs://, fsspec), opened through shards.fs."""
    from shards import fs as shard_fs

    prefix = key_prefix or shard_fs.basename(path)
    pf = open_parquet(path)
    cols = pf.schema_arrow.names
    image_col = _pick(cols, IMAGE_COLUMNS)
    if image_col is None:
        raise UserError(f"{path} has no image column (looked for {', '.join(IMAGE_COLUMNS)}): write image bytes into one of them")
    alt_col, key_col = _pick(cols, ALT_COLUMNS), _pick(cols, ("key",))
    wanted = [c for c in (image_col, alt_col, key_col) if c]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
        d = batch.to_pydict()
        for i, value in enumerate(d[image_col]):
            if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
                value = value.get("bytes")
            key = f"{prefix}/{d[key_col][i]}" if key_col and d[key_col][i] is not None else f"{prefix}/{row}"
            yield ImageItem(
                key=key, source=str(path), member=str(row), data=value or b"",
                alt=d[alt_col][i] if alt_col else None,
            )  # fmt: skip
            row += 1


def iter_sources(srcs: Sequence[str | Path]) -> Iterator[ImageItem]:
    """All items of all sources, in a stable order."""
    for src in srcs:
        p = Path(src)
        if p.is_dir():
            yield from iter_folder(p)
        elif _is_tar(p):
            yield from iter_tar(p)
        elif p.suffix == ".parquet":
            yield from iter_parquet(p)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            yield ImageItem(key=p.name, source=str(p), path=str(p))
        else:
            raise UserError(f"--src {src}: not a folder, .tar, .parquet or image file: pass one of those")


def _count_tar_images(path: Path) -> int | None:
    """Image members of an uncompressed tar, from its headers alone (seeks over the data, so an
    SA-1B tar of ~11k images is listed in well under a second); None for compressed tars."""
    if not path.name.endswith(".tar"):
        return None
    try:
        with tarfile.open(path, mode="r:") as tf:
            return sum(1 for m in tf if m.isfile() and PurePosixPath(m.name).suffix.lower() in IMAGE_EXTS)
    except (tarfile.TarError, OSError):
        return None


def count_items(srcs: Sequence[str | Path]) -> int | None:
    """How many items iter_sources will yield, when that is cheap to know (for the progress
    bar's ETA; None when unknown, e.g. with compressed tars)."""
    total = 0
    for src in srcs:
        p = Path(src)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if _is_tar(f):
                n = _count_tar_images(f)
                if n is None:
                    return None
                total += n
                continue
            if f.suffix == ".parquet":
                total += open_parquet(f).metadata.num_rows if (f == p or has_image_column(f)) else 0
            elif f.suffix.lower() in IMAGE_EXTS and f.is_file():
                total += 1
    return total


def validate_sources(srcs: Sequence[str | Path]) -> None:
    """UserError for a missing --src, before any work starts."""
    if not srcs:
        raise UserError("no --src given: pass a folder, SA-1B .tar or .parquet with images")
    for src in srcs:
        if not Path(src).exists():
            raise UserError(f"--src {src} does not exist: pass an existing folder, .tar or .parquet")
        if Path(src).suffix == ".parquet":
            open_parquet(src)  # a damaged file fails here, in one line, before any model loads


def open_parquet(path: Path | str) -> pq.ParquetFile:
    """The ParquetFile at `path` (a path or URI); UserError (one line) when it is not readable Parquet."""
    from shards import fs as shard_fs

    try:
        return shard_fs.parquet_file(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"--src {path} is not a readable Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        "download it again or leave it out") from None


def has_image_column(path: Path | str) -> bool:
    """Whether a Parquet file holds images (one of IMAGE_COLUMNS), rather than only metadata."""
    return _pick(open_parquet(path).schema_arrow.names, IMAGE_COLUMNS) is not None

