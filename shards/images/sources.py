"""Listing image sources: folders (recursive, SA-1B JSON sidecars), SA-1B tars, Parquet files
with image bytes; local paths or URIs (s3://, gs://, any fsspec scheme, through shards.fs).

Every image gets a KEY, stable across reruns (resume matches on it) and unique in the run, and an
ADDRESS (shards.images.address) that any later job reads it from, from any working directory.

Keys: `<source name>/<relative path>` for files in a folder, `<tar name>/<member>` for tar
members, `<parquet name>/<key column or row>` for Parquet rows, the file name for a single image.
The source name is the folder's (tar's, file's) own name; when two sources of one run would share
it (`--src a/imgs --src b/imgs`), each takes as many parent folders as it needs to be unique
(`a/imgs/...`, `b/imgs/...`). Inside one tar or Parquet file a repeated key (a member name stored
twice, a repeated `key` value) becomes `<key>~2`, `~3`, ... in archive order: every image once,
each under its own address. Tar members that are links, or whose names are absolute or climb
out with `..`, become items with an `error` (never read).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterator, Sequence

from shards import fs
from shards.errors import UserError
from shards.images.address import (
    IMAGE_COLUMNS, IMAGE_EXTS, Address, absolute, canonical, image_suffix, is_compressed_tar, is_tar, pick_column,
)  # fmt: skip

if TYPE_CHECKING:
    import pyarrow.parquet as pq

ALT_COLUMNS = ("alt_text", "caption", "TEXT", "text", "alt", "txt")
TRUNCATED = "#truncated"  # key suffix of the error row of a tar that ended early


@dataclass
class ImageItem:
    """One input image. `data` holds its bytes when the lister already read them (tar members,
    Parquet rows); otherwise they are read from `address`. `error` is set when the source itself
    rejects the item (unsafe or linked tar member, unreadable archive)."""

    key: str
    source: str  # absolute path or URI of the file, tar or Parquet file it is in
    address: str | None = None  # see shards.images.address; None for error items
    member: str | None = None  # tar member name or Parquet row (for people; jobs read `address`)
    data: bytes | None = None
    alt: str | None = None
    image_id: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        return fs.read_bytes(self.address) if self.address else b""


@dataclass
class SourceEntry:
    """One file found in the sources: a plain image (`key` is its key), or a tar / Parquet file
    (`key` is the prefix of its items' keys)."""

    kind: str  # "file" | "tar" | "parquet"
    location: str  # absolute path or URI
    key: str
    sidecar: str | None = None  # a plain image's SA-1B JSON sidecar, read with the image


class _UniqueKeys:
    """Renames a key seen before in the same container to `<key>~2`, `~3`, ..."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, key: str) -> str:
        unique, n = key, 1
        while unique in self.seen:
            n += 1
            unique = f"{key}~{n}"
        self.seen.add(unique)
        return unique


def sidecar_info(raw: bytes | str) -> dict:
    """image_id/width/height from an SA-1B JSON sidecar ({"image": {...}, "annotations": [...]}),
    plus an alt-text when the sidecar carries one (`image.alt_text`; SA-1B itself has none, an
    img2dataset sidecar has a top-level `caption`)."""
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


def source_names(locations: Sequence[str]) -> list[str]:
    """Key prefixes for the sources of one run: each one's own name, extended by parent folders
    until no name equals another or is a folder prefix of another (`a/imgs` vs `b/imgs`)."""
    parts = [loc.rstrip("/").split("/") for loc in locations]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clash = {i for i, a in enumerate(names) for j, b in enumerate(names) if i != j and (a == b or b.startswith(a + "/"))}
        if not clash:
            return names
        grow = [i for i in clash if depth[i] < len(parts[i])]
        if not grow:
            raise UserError(f"--src {', '.join(locations[i] for i in sorted(clash))} give the same keys: pass each source once")
        for i in grow:
            depth[i] += 1


def _walk(root: str) -> list[str]:
    """Relative paths of the files under a local or remote folder, sorted folder by folder."""
    loc = fs.as_location(root)
    if isinstance(loc, Path):
        rels = [p.relative_to(loc).as_posix() for p in loc.rglob("*") if p.is_file()]
    else:
        import pyarrow.fs as pafs

        filesystem, path = fs.resolve(loc)
        found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        rels = [f.path[len(path.rstrip("/")) + 1 :] for f in found if f.type == pafs.FileType.File]
    return sorted(rels, key=lambda r: r.split("/"))


def _classify(name: str) -> str | None:
    if is_tar(name):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    return "file" if image_suffix(name) in IMAGE_EXTS else None


def iter_entries(srcs: Sequence[str | Path]) -> Iterator[SourceEntry]:
    """Every image file, tar and Parquet file of the sources, in a stable order; UserError for a
    source that does not exist or is of no known kind (raised before the first entry)."""
    locations = list(dict.fromkeys(absolute(s) for s in srcs))  # the same source twice: once
    for given, loc in zip(srcs, locations):
        if not fs.exists(loc):
            raise UserError(f"--src {given} does not exist: pass an existing folder, .tar or .parquet")
    for loc, name in zip(locations, source_names(locations)):
        if fs.is_dir(loc):
            rels = _walk(loc)
            present = set(rels)
            for rel in rels:
                kind = _classify(rel)
                if kind is None or (kind == "parquet" and not has_image_column(f"{loc}/{rel}")):
                    continue  # a Parquet file without images beside them is metadata (img2dataset's layout)
                sidecar = rel.rsplit(".", 1)[0] + ".json"
                has_sidecar = kind == "file" and sidecar in present
                yield SourceEntry(kind, f"{loc}/{rel}", f"{name}/{rel}", f"{loc}/{sidecar}" if has_sidecar else None)
        elif _classify(loc) is not None:
            yield SourceEntry(_classify(loc), loc, name)
        else:
            raise UserError(f"--src {loc}: not a folder, .tar, .parquet or image file: pass one of those")


def _unsafe_member(name: str) -> bool:
    pp = PurePosixPath(name)
    return name.startswith(("/", "\\")) or pp.is_absolute() or ".." in pp.parts or ":" in (pp.parts[0] if pp.parts else "")


def iter_tar(location: str, prefix: str, max_pending: int = 64) -> Iterator[ImageItem]:
    """Stream a tar (local or URI, plain or gzip) without extracting it; each image is addressed
    by its data offset. `sa_<id>.json` sidecars are matched to their image when they are near it
    in the archive (SA-1B keeps them adjacent)."""
    unique = _UniqueKeys()
    pending: dict[str, ImageItem] = {}  # images waiting for their sidecar
    infos: dict[str, dict] = {}  # sidecars seen before their image
    try:
        stream = fs.open_input(location)
        tf = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, OSError) as e:
        yield ImageItem(key=prefix, source=location, error=f"unreadable tar: {e}")
        return
    with stream, tf:
        try:
            for m in tf:
                is_image = image_suffix(m.name) in IMAGE_EXTS
                stem = m.name.rsplit(".", 1)[0]
                if is_image and (m.issym() or m.islnk() or _unsafe_member(m.name)):
                    why = "a link inside the archive" if m.issym() or m.islnk() else "an absolute or '..' name"
                    yield ImageItem(key=unique(f"{prefix}/{m.name}"), source=location, member=m.name,
                                    error=f"unsafe tar member ({why}): not read")  # fmt: skip
                elif not m.isfile() or _unsafe_member(m.name):
                    continue
                elif m.name.endswith(".json"):
                    info = sidecar_info(tf.extractfile(m).read())
                    if stem in pending:
                        item = pending.pop(stem)
                        _apply(item, info)
                        yield item
                    else:
                        infos[stem] = info
                elif is_image:
                    address = str(Address(canonical(location), offset=m.offset_data, size=m.size))
                    item = ImageItem(key=unique(f"{prefix}/{m.name}"), source=location, member=m.name, address=address,
                                     data=tf.extractfile(m).read())  # fmt: skip
                    if stem in infos:
                        _apply(item, infos.pop(stem))
                        yield item
                    else:
                        if stem in pending:  # the same name again: the earlier one's sidecar is not coming
                            yield pending.pop(stem)
                        pending[stem] = item
                        if len(pending) > max_pending:  # its sidecar is not coming soon: don't hoard memory
                            yield pending.pop(next(iter(pending)))
        except (tarfile.TarError, OSError, EOFError) as e:
            yield ImageItem(key=f"{prefix}{TRUNCATED}", source=location, error=f"tar stream ended early: {e}")
    yield from pending.values()


def _apply(item: ImageItem, info: dict) -> None:
    for k, v in info.items():
        setattr(item, k, v)


def iter_parquet(location: str, prefix: str, batch_rows: int = 256) -> Iterator[ImageItem]:
    """Rows of a Parquet file with encoded image bytes (img2dataset, HF datasets {bytes, path})."""
    pf = open_parquet(location)
    cols = pf.schema_arrow.names
    image_col = pick_column(cols, IMAGE_COLUMNS)
    if image_col is None:
        raise UserError(f"{location} has no image column (looked for {', '.join(IMAGE_COLUMNS)}): write image bytes into one of them")
    alt_col, key_col = pick_column(cols, ALT_COLUMNS), pick_column(cols, ("key",))
    unique = _UniqueKeys()
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[c for c in (image_col, alt_col, key_col) if c]):
        d = batch.to_pydict()
        for i, value in enumerate(d[image_col]):
            if isinstance(value, dict):  # HF datasets Image feature: {"bytes": ..., "path": ...}
                value = value.get("bytes")
            name = d[key_col][i] if key_col and d[key_col][i] is not None else row
            yield ImageItem(
                key=unique(f"{prefix}/{name}"), source=location, member=str(row), address=str(Address(canonical(location), row=row)),
                data=value or b"", alt=d[alt_col][i] if alt_col else None,
            )  # fmt: skip
            row += 1


def iter_entry(entry: SourceEntry) -> Iterator[ImageItem]:
    """The items of one entry (bytes of tar members and Parquet rows read here)."""
    if entry.kind == "tar":
        yield from iter_tar(entry.location, entry.key)
    elif entry.kind == "parquet":
        yield from iter_parquet(entry.location, entry.key)
    else:
        item = ImageItem(key=entry.key, source=entry.location, address=canonical(entry.location))
        if entry.sidecar:
            _apply(item, sidecar_info(fs.read_bytes(entry.sidecar)))
        yield item


def iter_sources(srcs: Sequence[str | Path]) -> Iterator[ImageItem]:
    """All items of all sources, in a stable order, each key once."""
    for entry in iter_entries(srcs):
        yield from iter_entry(entry)


def _count_tar_images(location: str) -> int | None:
    """Image members of a local uncompressed tar, from its headers alone (seeks over the data,
    so an SA-1B tar of ~11k images is listed in well under a second); None otherwise."""
    if fs.is_uri(location) or is_compressed_tar(location):
        return None
    try:
        with tarfile.open(location, mode="r:") as tf:
            return sum(1 for m in tf if image_suffix(m.name) in IMAGE_EXTS and (m.isfile() or m.issym() or m.islnk()))
    except (tarfile.TarError, OSError):
        return None


def count_items(srcs: Sequence[str | Path]) -> int | None:
    """How many items iter_sources will yield, when that is cheap to know (for the progress
    bar's ETA; None when unknown: compressed tars, or remote sources, not listed twice)."""
    if any(fs.is_uri(str(s)) for s in srcs):
        return None
    total = 0
    for entry in iter_entries(srcs):
        if entry.kind == "tar":
            n = _count_tar_images(entry.location)
            if n is None:
                return None
            total += n
        elif entry.kind == "parquet":
            total += open_parquet(entry.location).metadata.num_rows
        else:
            total += 1
    return total


def validate_sources(srcs: Sequence[str | Path]) -> None:
    """UserError for a missing or unknown --src, or sources whose keys clash, before any work."""
    if not srcs:
        raise UserError("no --src given: pass a folder, SA-1B .tar or .parquet with images")
    for src in srcs:
        if not fs.exists(absolute(src)):
            raise UserError(f"--src {src} does not exist: pass an existing folder, .tar or .parquet")
        if str(src).endswith(".parquet"):
            open_parquet(absolute(src))  # a damaged file fails here, in one line, before any model loads
    source_names(list(dict.fromkeys(absolute(s) for s in srcs)))


def open_parquet(location: str) -> "pq.ParquetFile":
    """The ParquetFile at `location` (a path or URI); UserError (one line) when it is not readable Parquet."""
    import pyarrow as pa

    try:
        return fs.parquet_file(location)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"--src {location} is not a readable Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                        "download it again or leave it out") from None


def has_image_column(location: str) -> bool:
    """Whether a Parquet file holds images (one of IMAGE_COLUMNS), rather than only metadata."""
    return pick_column(open_parquet(location).schema_arrow.names, IMAGE_COLUMNS) is not None
