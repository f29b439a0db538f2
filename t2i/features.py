"""Encode every captioned image once: VAE posterior mean + std and T5 features + mask.

    caption shards -> rows (this rank's keys, not yet done) -> decode workers (threads: read by
    address + the shared decode policy + resize/crop) -> batches of one size -> VAE + T5 (bf16 on
    GPU, fp32 on CPU) -> feature shards (ShardWriter: atomic, done markers) in `<root>/<cache key>/`

- Images are read through the image layer (shards.images): by the absolute `address` each
  caption row records (tar members by offset, Parquet rows by row group), decoded under the same
  policy as `caption` (EXIF orientation, RGB, bomb guard, JPEG draft decode). Caption shards
  written before addresses existed (schema 1) are read by (source, member).
- The cache key hashes everything that changes the features (VAE, text encoder, resolution,
  buckets, token count, dtypes, draft decode), so a different setting never reuses stale
  features, and a rerun skips keys already encoded (resume; `kill -9` loses at most the rows
  not yet in a complete shard).
- Data-parallel: under `torchrun` / `accelerate launch` (WORLD_SIZE > 1) each rank reads only
  its share of the caption shards' row groups (round robin over all row groups in shard name
  order: no rank reads another's rows or image bytes) and writes its own shards
  (`features-r<rank>-...`); rank 0 cleans up before and writes the manifest after (then the
  loader's index cache, `index.npz`, t2i.feature_index), the summary's
  counts are summed over the ranks (gloo). Any world size resumes any other's directory (done
  keys are skipped, whoever wrote them).
- An image that cannot be read or decoded is recorded (key + error) in `failures-<writer>.json`
  and in the manifest's `failures`, skipped (not retried by reruns), and counted in the summary.
- Several caption fields (`caption_fields`, t2i.caption_fields; default `caption` alone): T5
  features of each field an image has, each in its own columns; a field an image lacks is
  skipped for that image (counted per field in the summary's `missing_fields`).
- Latents are stored in `latent_dtype` (float32 | float16 | bfloat16, column `latent_dtype`;
  shards without the column hold float32), text features in `text_dtype`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from shards import ShardError, UserError, clean_incomplete, complete_shards, done_keys
from shards import fs as shard_fs
from shards.images import DEFAULT_MAX_PIXELS, Address, ImageError, ImageReader, decode_image, legacy_address
from shards.images.address import is_compressed_tar
from shards.lock import output_lock
from shards.prefetch import prefetch
from shards.writer import write_manifest
from t2i.caption_fields import DEFAULT_FIELDS, parse_fields, text_columns
from t2i.encoders import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, encode_text, load_text_encoder, load_vae
from t2i.feature_index import open_index

FEATURE_VERSION = 2  # 2: shared decode policy (EXIF, draft), latent_dtype
DTYPES = ("float32", "float16", "bfloat16")

FEATURE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("height", pa.int32()),  # pixel size the image was resized/cropped to (its bucket)
        pa.field("width", pa.int32()),
        pa.field("latent_shape", pa.list_(pa.int32())),  # (C, h, w)
        pa.field("latent_mean", pa.binary()),  # raw posterior (not yet scaled), in `latent_dtype`
        pa.field("latent_std", pa.binary()),  # in `latent_dtype`
        pa.field("text_emb", pa.binary()),  # (text_len, text_channels) in `text_dtype`
        pa.field("text_len", pa.int32()),  # tokens kept by the attention mask (incl. </s>)
        pa.field("text_channels", pa.int32()),
        pa.field("text_dtype", pa.string()),
        pa.field("latent_dtype", pa.string()),  # float32 | float16 | bfloat16; null/absent: float32
    ],
    metadata={b"t2i_data.schema": b"features", b"t2i_data.schema_version": str(FEATURE_VERSION).encode()},
)


def feature_schema(fields: tuple[str, ...]) -> pa.Schema:
    """FEATURE_SCHEMA for the default `caption` field; with other caption fields, the text
    columns of each (t2i.caption_fields.text_columns) in place of caption/text_emb/text_len."""
    if tuple(fields) == DEFAULT_FIELDS:
        return FEATURE_SCHEMA
    base = [f for f in FEATURE_SCHEMA if f.name not in ("caption", "text_emb", "text_len")]
    per_field = [pa.field(name, kind) for c in map(text_columns, fields)
                 for name, kind in ((c.text, pa.string()), (c.emb, pa.binary()), (c.len, pa.int32()))]  # fmt: skip
    return pa.schema(base[:1] + per_field + base[1:], metadata=FEATURE_SCHEMA.metadata)


@dataclass
class FeatureConfig:
    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_TEXT_ENCODER
    resolution: int = 256
    buckets: bool = False  # multi-aspect: the 256/512/1024 aspect-ratio bins of PixArt
    max_tokens: int = 120
    text_dtype: str = "float16"
    latent_dtype: str = "float32"  # how latents are stored; float16/bfloat16 halve the disk
    draft: bool = True  # JPEG DCT-scaled decoding down to what the resize needs
    batch_size: int = 16
    rows_per_shard: int = 1000
    workers: int = 0  # decode threads (0: cores, at most 8)
    max_pixels: int = DEFAULT_MAX_PIXELS  # bomb guard: larger images are recorded as failures
    caption_fields: tuple[str, ...] = DEFAULT_FIELDS  # caption-shard fields to encode, each its own T5 features

    def __post_init__(self) -> None:
        self.caption_fields = parse_fields(self.caption_fields)

    def cache_key(self) -> str:
        ident = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "rows_per_shard", "workers", "max_pixels")}
        if self.caption_fields == DEFAULT_FIELDS:  # so features made before the option keep their key
            del ident["caption_fields"]
        else:
            ident["caption_fields"] = list(self.caption_fields)
        for k in ("vae", "text_encoder"):  # a local directory is identified by its absolute path
            p = Path(ident[k])
            ident[k] = str(p.resolve()) if p.exists() else ident[k]
        ident["version"] = FEATURE_VERSION
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        for name in ("text_dtype", "latent_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of {', '.join(DTYPES)}: pick one")
        for name in ("batch_size", "rows_per_shard", "resolution", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} {getattr(self, name)} must be at least 1: pass a positive number")


# ---- images ------------------------------------------------------------------------------------

def aspect_ratio_table(resolution: int) -> dict[str, list[float]]:
    """PixArt's aspect-ratio bins (h/w -> [h, w]) shipped by diffusers for 256/512/1024."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    tables = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}
    if resolution not in tables:
        raise UserError(f"aspect-ratio buckets exist for resolutions 256, 512 and 1024, not {resolution}: set buckets = false or pick one of those")
    return tables[resolution]


def target_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """(height, width) in pixels: the square `resolution`, or the closest aspect-ratio bin."""
    if not buckets:
        return resolution, resolution
    table = aspect_ratio_table(resolution)
    ratio = min(table, key=lambda r: abs(float(r) - height / width))
    h, w = table[ratio]
    return int(h), int(w)


def row_address(row: dict[str, Any], legacy: dict[str, dict]) -> Address:
    """Where a caption row's image is: its `address`, or (schema-1 rows) its source + member."""
    if row.get("address"):
        return Address.parse(row["address"])
    if not row.get("source"):
        raise OSError("row has neither embedded image bytes nor a source")
    return legacy_address(row["source"], row.get("member"), legacy)


def load_image(row: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS):
    """One row's image, upright RGB at full size, under the decode policy features uses (for
    inspection and tests; the job itself reads through RowImages' shared reader)."""
    data = row.get("image") or ImageReader().read(row_address(row, {}))
    return decode_image(data, max_pixels=max_pixels).image


def image_to_tensor(img, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width), centre-crop, scale to [-1, 1]; (3, H, W)."""
    from PIL import Image

    s = max(height / img.height, width / img.width)
    nw, nh = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


class RowImages:
    """Caption row -> (row, pixel tensor at its bucket size, None) or (row, None, error).
    `locate` runs in the producer thread (it reads compressed tars, which only stream forward);
    `__call__` runs in the decode workers."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg, self.reader, self.legacy = cfg, ImageReader(), {}

    def locate(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("image"):
            return row
        try:
            a = row_address(row, self.legacy)
            row["_address"] = a
            if a.offset is not None and is_compressed_tar(a.location):
                row["image"] = self.reader.read(a)
        except (OSError, pa.ArrowException, UserError, ValueError) as e:
            row["_error"] = f"unreadable: {e}"
        return row

    def _draft_short(self, width: int, height: int) -> int:
        h, w = target_size(width, height, self.cfg.resolution, self.cfg.buckets)
        return math.ceil(min(width, height) * max(h / height, w / width))

    def __call__(self, row: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None, str | None]:
        if row.get("_error"):
            return row, None, row["_error"]
        try:
            data = row.get("image") or self.reader.read(row["_address"])
        except (OSError, pa.ArrowException, UserError) as e:
            return row, None, f"unreadable: {e}"
        try:
            img = decode_image(data, self._draft_short if self.cfg.draft else None, self.cfg.max_pixels).image
        except ImageError as e:
            return row, None, str(e)
        h, w = target_size(img.width, img.height, self.cfg.resolution, self.cfg.buckets)
        return row, image_to_tensor(img, h, w), None

    def close(self) -> None:
        self.reader.close()


# ---- ranks -------------------------------------------------------------------------------------

@dataclass
class Ranks:
    """This process's share of a data-parallel features run (rank 0 of 1 by default)."""

    rank: int = 0
    world_size: int = 1

    def share(self, shards: list["CaptionShard"]) -> list[tuple["CaptionShard", list[int]]]:
        """The row groups this rank reads, by shard: the i-th row group of all the shards (in
        name order) is rank i % world_size's. Disjoint and together all of them, fixed by the
        shards alone (not by what is done), so every rank of a run reads each row exactly once."""
        mine, i = [], 0
        for shard in shards:
            groups = [g for g in range(len(shard.group_rows)) if (i + g) % self.world_size == self.rank]
            i += len(shard.group_rows)
            if groups:
                mine.append((shard, groups))
        return mine

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def total(self, counts: list[int]) -> list[int]:
        """`counts` summed over the ranks (a collective, on a gloo group: CPU tensors whatever
        backend the ranks' default group has, nccl included)."""
        if self.world_size == 1:
            return list(counts)
        dist = torch.distributed
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        t = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def close(self) -> None:
        """Leave the process group ranks_from_env joined (a clean exit under torchrun)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def ranks_from_env() -> Ranks:
    """Ranks from torchrun / accelerate launch's environment; joins a gloo group (barriers only,
    so GPUs and CPUs alike) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():  # ranks finish at different times: the last barrier waits long
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return Ranks(dist.get_rank(), dist.get_world_size())


def default_device(ranks: Ranks) -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', ranks.rank)) % torch.cuda.device_count()}"
    return "cpu"


# ---- the step ----------------------------------------------------------------------------------

CAPTION_COLUMNS = ("key", "caption", "error", "image", "source", "member", "address")


def row_columns(fields: tuple[str, ...]) -> tuple[str, ...]:
    """The caption-shard columns features reads for `fields` (caption fields)."""
    return CAPTION_COLUMNS + tuple(f for f in fields if f not in CAPTION_COLUMNS)


class CaptionShard(NamedTuple):
    """A complete caption shard, from its footer: where it is, its columns, rows per row group."""

    location: Any
    columns: list[str]
    group_rows: tuple[int, ...]


def caption_shards(shards_dir: str | Path, fields: tuple[str, ...] = DEFAULT_FIELDS) -> list[CaptionShard]:
    """Every complete caption shard (its footer read once), checked before any work; shards of
    caption schema 1 have no `address` (their rows are located by source + member). With other
    caption fields than the default, a field no shard holds a value of is an error."""
    shards = [_caption_shard(s) for s in complete_shards(shards_dir)]  # a local path or a URI
    for shard in shards:
        if not {"caption", "key"} <= set(shard.columns):
            raise ShardError(f"{shard.location} has no caption/key column: pass caption shards written by `t2i-data caption`")
    if tuple(fields) != DEFAULT_FIELDS:
        for f, n in _values_written([s.location for s in shards], fields).items():
            if n == 0:
                raise UserError(f"caption field {f!r} has no value in any caption shard of {shards_dir}: caption with the "
                                f"prompt that writes it (`t2i-data caption --prompts ...`) or drop it from caption_fields")
    return shards


def _caption_shard(location) -> CaptionShard:
    md = shard_fs.parquet_file(location).metadata
    return CaptionShard(location, md.schema.to_arrow_schema().names, tuple(md.row_group(g).num_rows for g in range(md.num_row_groups)))


def _values_written(shards: list, fields: tuple[str, ...]) -> dict[str, int | None]:
    """Non-null values of each field over `shards`, from the Parquet footers' statistics alone
    (None: not known, a shard without statistics)."""
    counts: dict[str, int | None] = dict.fromkeys(fields, 0)
    for shard in shards:
        md = shard_fs.parquet_file(shard).metadata
        for g in range(md.num_row_groups):
            group = md.row_group(g)
            leaf = {group.column(j).path_in_schema: j for j in range(group.num_columns)}
            for f in fields:
                if counts[f] is None or f not in leaf:
                    continue
                st = group.column(leaf[f]).statistics
                counts[f] = None if st is None or not st.has_null_count else counts[f] + group.num_rows - st.null_count
    return counts


def shard_rows(shard, cols: list[str], columns: Iterable[str] = CAPTION_COLUMNS,
               row_groups: Iterable[int] | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The rows of one caption shard (streamed, or only those of `row_groups`), with those of
    `columns` it has."""
    wanted = [c for c in columns if c in cols]
    pf = shard_fs.parquet_file(shard)
    if row_groups is None:
        for batch in pf.iter_batches(batch_size=256, columns=wanted):
            yield from batch.to_pylist()
        return
    for g in row_groups:  # one row group (~1 MiB with embedded images) in memory at a time
        for batch in pf.read_row_group(g, columns=wanted).to_batches(256):
            yield from batch.to_pylist()


def usable(row: dict[str, Any], fields: tuple[str, ...] = DEFAULT_FIELDS) -> bool:
    """A caption row features encode: without an error, with text in at least one of `fields`."""
    return row["error"] is None and any(row.get(f) for f in fields)


def count_row(row: dict[str, Any], fields: tuple[str, ...], stats: dict[str, Any]) -> bool:
    """Tally one caption row into the summary (valid, skipped_invalid, and per caption field the
    usable rows without it: that field is skipped for that image); whether it is encoded."""
    if not usable(row, fields):
        stats["skipped_invalid"] += 1
        return False
    stats["valid"] += 1
    for f in fields:
        if not row.get(f):
            stats["missing_fields"][f] = stats["missing_fields"].get(f, 0) + 1
    return True


def features_dir(root: str | Path, cfg: FeatureConfig) -> Path:
    return Path(root) / cfg.cache_key()


def read_failures(out: Path) -> dict[str, str]:
    """key -> error of every image recorded as unreadable in `out` (all ranks, all runs)."""
    failures: dict[str, str] = {}
    for p in sorted(out.glob("failures-*.json")):
        failures.update(json.loads(p.read_text()))
    return failures


def _todo(share: list[tuple[CaptionShard, list[int]]], fields: tuple[str, ...], done: set[str], failed: dict[str, str],
          stats: dict, advance: Callable) -> Iterator[dict]:  # fmt: skip
    """The rows of this rank's row groups (Ranks.share) still to encode, counted into `stats`."""
    for shard, groups in share:  # streamed: never all rows (and image bytes) in memory
        for r in shard_rows(shard.location, shard.columns, row_columns(fields), groups):
            advance()
            if count_row(r, fields, stats) and r["key"] not in done and r["key"] not in failed:
                yield r


def compute_features(
    shards_dir: str | Path, root: str | Path, cfg: FeatureConfig, device: str | None = None, progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Encode every valid caption row of `shards_dir` not yet in `root/<cache key>/`; this
    process takes `ranks`' share (default: all). See the module docstring.

    Returns {"dir", "rows" (total encoded), "new", "skipped_invalid", "failed" (images recorded
    as unreadable in the directory), "failures" (the first 20, "key: error"), "valid",
    "missing_fields" (caption field -> usable rows without it, that field skipped for them)}.
    """
    import contextlib

    cfg.validate()
    ranks = ranks or Ranks()
    shards_dir = shard_fs.as_location(shards_dir)  # caption shards may be on an object store (s3://, gs://, ...)
    if not complete_shards(shards_dir):
        raise ShardError(f"no complete caption shards in {shards_dir}: run `t2i-data caption --out {shards_dir}` first")
    shards = caption_shards(shards_dir, cfg.caption_fields)  # bad shards or fields: before the output is touched
    out = features_dir(root, cfg)
    # one writer per features directory, taken before any clean-up: rank 0 holds it for all ranks
    with output_lock(out, "features") if ranks.rank == 0 else contextlib.nullcontext():
        return _compute_features_locked(shards_dir, shards, out, cfg, device, progress, ranks)


def _compute_features_locked(shards_dir, shards: list, out: Path, cfg: FeatureConfig, device: str | None, progress: bool,
                             ranks: Ranks) -> dict[str, Any]:
    """compute_features, run while rank 0 holds `out`'s lock."""
    from rich.progress import Progress

    if ranks.rank == 0:
        start_output(out, cfg)
        _write_plan(out, shards)
    ranks.barrier()  # nobody writes before the leftovers of a crash are gone
    _check_plan(out, shards, shards_dir)  # every rank shares out the same row groups
    device = device or default_device(ranks)
    from shards.ledger import Ledger

    ledger = Ledger(out, "features", device)  # one line per rank in ledger.jsonl
    stats = new_stats(out)
    encoder = FeatureEncoder(out, cfg, device, ranks.rank)
    images = RowImages(cfg)
    share = ranks.share(shards)
    with Progress(disable=not progress or ranks.rank != 0) as bar:
        task = bar.add_task("features", total=sum(s.group_rows[g] for s, groups in share for g in groups))
        todo = _todo(share, cfg.caption_fields, done_keys(out), read_failures(out), stats, lambda: bar.advance(task))
        stats["new"] += encode_rows(todo, images, encoder)
    images.close()
    stats["ledger"] = ledger.close(images=stats["new"])
    _sum_counts(stats, cfg.caption_fields, ranks)  # each rank counted the rows it read; also waits for every rank
    return finish_output(out, cfg, shards_dir, stats, write=ranks.rank == 0)


def _sum_counts(stats: dict[str, Any], fields: tuple[str, ...], ranks: Ranks) -> None:
    """The summary's row counts over all ranks (each read only its own row groups)."""
    names = ["valid", "skipped_invalid"]
    summed = ranks.total([stats[n] for n in names] + [stats["missing_fields"].get(f, 0) for f in fields])
    stats.update(zip(names, summed))
    stats["missing_fields"] = {f: n for f, n in zip(fields, summed[len(names):]) if n}


PLAN = "plan.json"


def _plan(shards: list[CaptionShard]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([[str(s.location), list(s.group_rows)] for s in shards]).encode()).hexdigest()
    return {"shards": len(shards), "row_groups": sum(len(s.group_rows) for s in shards), "sha256": digest}


def _write_plan(out: Path, shards: list[CaptionShard]) -> None:
    """What rank 0 shares out (Ranks.share): the caption shards and their row groups."""
    shard_fs.write_text(out / PLAN, json.dumps(_plan(shards)))


def _check_plan(out: Path, shards: list[CaptionShard], shards_dir) -> None:
    """Every rank saw the caption shards rank 0 saw: otherwise the shares could overlap."""
    if json.loads((out / PLAN).read_text()) != _plan(shards):
        raise ShardError(f"the caption shards in {shards_dir} changed while features started (this rank sees other shards "
                         "than rank 0): rerun once the caption job has finished")


def start_output(out: Path, cfg: FeatureConfig) -> None:
    """Before any rank writes: the directory, a crash's leftovers gone, the settings recorded."""
    out.mkdir(parents=True, exist_ok=True)
    clean_incomplete(out)
    (out / "config.json").write_text(json.dumps({**asdict(cfg), "cache_key": cfg.cache_key()}, indent=2))


def new_stats(out: Path) -> dict[str, Any]:
    return {"dir": str(out), "new": 0, "skipped_invalid": 0, "failed": 0, "failures": [], "valid": 0, "missing_fields": {}}


def encode_rows(rows: Iterable[dict[str, Any]], images: "RowImages", encoder: "FeatureEncoder") -> int:
    """The features of `rows` (caption rows): read and decoded ahead by threads, encoded in
    batches of one size, written as `encoder`'s shards; unreadable images recorded as failures.
    Every engine (this process, torchrun ranks, Ray actors) encodes through here. Returns the
    number of rows encoded; the last shard is flushed."""
    cfg = encoder.cfg
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    new = 0
    for row, pixels, error in prefetch(images, map(images.locate, rows), workers, max(2 * cfg.batch_size, 4 * workers), "decode"):
        if error is not None:
            encoder.record_failure(row["key"], error)
        else:
            new += encoder.add(row, pixels)
    return new + encoder.close()


def finish_output(out: Path, cfg: FeatureConfig, shards_dir, stats: dict[str, Any], write: bool = True) -> dict[str, Any]:
    """After every writer is done: the summary (rows, failures) and, when `write` (the one
    finishing process), the manifest and then the loader's index cache."""
    if not stats["valid"]:
        raise ShardError(f"{shards_dir} has no rows with a caption (all null or errored): caption the images first")
    failures = read_failures(out)
    stats.update(failed=len(failures), failures=[f"{k}: {e}" for k, e in list(failures.items())[:20]], rows=len(done_keys(out)))
    if write:
        _write_manifest(out, cfg, shards_dir, failures)
        if stats["rows"]:
            # the directory is complete now: build the index once here (a valid cache is only loaded),
            # not in the first training open, nor on each node of a run on per-node local disks
            open_index(out, [str(s) for s in complete_shards(out)], parse_fields(cfg.caption_fields))
    return stats


def _write_manifest(out: Path, cfg: FeatureConfig, shards_dir, failures: dict[str, str]) -> None:
    write_manifest(out, config={**asdict(cfg), "cache_key": cfg.cache_key()}, extra={
        "schema": "features", "schema_version": FEATURE_VERSION, "source": str(shards_dir),
        "failed": len(failures), "failures": [{"key": k, "error": e} for k, e in failures.items()]})  # fmt: skip


class FeatureEncoder:
    """Groups decoded images by size into batches, encodes them (VAE + T5, models loaded on the
    first batch: a fully cached run never loads them) and writes feature_schema rows to this
    rank's shards. Unreadable images go to `failures-<writer id>.json`, rewritten whole at
    every shard commit and at the end."""

    def __init__(self, out: Path, cfg: FeatureConfig, device: str, rank: int = 0, prefix: str | None = None) -> None:
        from shards import ShardWriter

        self.out, self.cfg, self.device = out, cfg, device
        self.writer = ShardWriter(out, rows_per_shard=cfg.rows_per_shard, schema=feature_schema(cfg.caption_fields),
                                  prefix=prefix or f"features-r{rank:03d}")
        self.pending: dict[tuple[int, int], list] = {}
        self.failures: dict[str, str] = {}
        self.models = None
        self.compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def add(self, row: dict[str, Any], pixels: torch.Tensor) -> int:
        """Queue one image; returns how many rows were encoded (a full batch of its size, or 0)."""
        group = self.pending.setdefault(tuple(pixels.shape[1:]), [])
        group.append((row, pixels))
        if len(group) < self.cfg.batch_size:
            return 0
        self.pending.pop(tuple(pixels.shape[1:]))
        return self._encode(group)

    def record_failure(self, key: str, error: str) -> None:
        self.failures[key] = error

    def close(self) -> int:
        """Encode what is left, flush the last shard, write the failures; rows encoded here."""
        n = sum(self._encode(group) for group in self.pending.values())
        self.pending = {}
        self.writer.flush()
        self._write_failures()
        return n

    def _write_failures(self) -> None:
        if self.failures:
            shard_fs.write_text(self.out / f"failures-{self.writer.writer_id}.json", json.dumps(self.failures, indent=0))

    @torch.no_grad()
    def _encode(self, group: list) -> int:
        if self.models is None:
            self.models = (load_vae(self.cfg.vae, self.device, self.compute_dtype),
                           *load_text_encoder(self.cfg.text_encoder, self.device, self.compute_dtype))  # fmt: skip
        vae = self.models[0]
        x = torch.stack([t for _, t in group]).to(self.device, vae.dtype)
        post = vae.encode(x).latent_dist
        latent_dtype = getattr(torch, self.cfg.latent_dtype)
        mean, std = post.mean.to(latent_dtype).cpu(), post.std.to(latent_dtype).cpu()
        texts, channels = self._encode_texts([r for r, _ in group])
        for i, (r, img) in enumerate(group):
            before = len(self.writer.written)
            self.writer.add({
                "key": r["key"], "height": img.shape[1], "width": img.shape[2],
                "latent_shape": list(mean.shape[1:]), "latent_mean": _raw(mean[i]), "latent_std": _raw(std[i]),
                "text_channels": channels, "text_dtype": self.cfg.text_dtype, "latent_dtype": self.cfg.latent_dtype,
                **texts[i],
            })  # fmt: skip
            if len(self.writer.written) > before:  # a shard was committed: its failures go with it
                self._write_failures()
        return len(group)

    def _encode_texts(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Each caption field's T5 features (one batch per field, of the rows that have it) as
        the feature-row columns of each row (null where a row lacks the field); text channels."""
        _, tok, enc = self.models
        cols: list[dict[str, Any]] = [{} for _ in rows]
        channels = 0
        for field in self.cfg.caption_fields:
            names = text_columns(field)
            has = [i for i, r in enumerate(rows) if r.get(field)]
            for c in cols:
                c.update({names.text: None, names.emb: None, names.len: None})
            if not has:
                continue
            emb, mask = encode_text(tok, enc, [rows[i][field] for i in has], self.cfg.max_tokens)
            emb, lens, channels = emb.to(getattr(torch, self.cfg.text_dtype)).cpu(), mask.sum(1).cpu(), emb.shape[-1]
            for j, i in enumerate(has):
                n = int(lens[j])
                cols[i].update({names.text: rows[i][field], names.emb: _raw(emb[j, :n]), names.len: n})
        return cols, channels


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes in its own dtype (bfloat16 too, which numpy lacks)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def decode_raw(buf: bytes, dtype: str | None, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of how features stores tensors: `dtype` from the row (`latent_dtype` /
    `text_dtype`; None, as in shards written before the column existed, is float32)."""
    return torch.frombuffer(bytearray(buf), dtype=getattr(torch, dtype or "float32")).view(*shape)
