"""`t2i-data caption --engine ray`: the caption job as a Ray Data pipeline.

    units (driver) -> read (CPU tasks) -> prepare (CPU tasks) -> CaptionActor (GPU/CPU actors)
      -> driver: iter_batches -> ShardWriter (same atomic shards, done markers and manifest)

- Units: the driver lists the sources with the image layer (shards.images.iter_entries: the
  local engine's keys and addresses): chunks of plain image files (addresses, no bytes), one unit
  per tar, one per Parquet file. Read tasks expand a unit with the same layer (iter_entry), so
  bytes are read on the workers, not the driver.
- Remote sources: `s3://`, `gs://` (and `file://`) URIs of folders, tars and Parquet files are
  listed and read through shards.fs (pyarrow's filesystems; credentials as pyarrow finds them:
  environment, instance role, ~/.aws).
- Resume: keys already in complete shards come back as `skip` rows (no bytes, no work); the
  driver counts them. `--retry-failed` works as in the local engine (same copy-on-write swap).
- Prepare: autolabel.prepare.prepare_for_model in CPU tasks; the RGB pixels travel losslessly
  (raw bytes + size) to the actors, so the model sees exactly what the local engine feeds it.
- Caption: `CaptionActor` wraps the project's own captioner (VllmCaptioner by default), so
  prompt formatting, sampling, hygiene and the row fields are the local engine's. One actor per
  replica; one GPU each when the cluster has GPUs, else one CPU.
- Write: for a first version the driver collects the captioned rows in input order and writes
  them into the job skeleton's run (shards.job: the local engine's lock, settings record,
  writer, ledger and manifest), to a local/mounted directory or straight to an object store
  (`--out s3://...`, `gs://...`, any fsspec URI; shards.fs). Every shard is committed by its
  appearance (shards.writer), so resume semantics are the local engine's. The driver's writing
  is light next to the captioning, but it is one process: a per-block writer in the workers
  would scale the writes further.

Ray is imported only here, and this module only when `--engine ray` is asked for.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Iterator

import pyarrow as pa
from PIL import Image

from shards.errors import UserError
from shards.schema import CAPTION_SCHEMA
from autolabel.backends import _load_processor
from autolabel.sizing import pixel_limits, set_pixel_limits, size_policy
from autolabel.config import CaptionConfig, PrepareOptions
from autolabel.pipeline import RunRecorder, base_row, caption_batch
from shards.job import Run, Summary
from shards.ray_session import actor_resources, fetch_once, import_ray, ray_session
from shards.images.sources import ImageItem, SourceEntry, count_items, iter_entries, iter_entry

FILES_PER_UNIT = 256  # plain image files per read task
RECORDS_PER_BLOCK = 64  # records per block a read task yields (bounds memory for big tars)

# The records flowing from the read stage to the prepare stage.
RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("member", pa.string()), ("image_id", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("alt_text", pa.string()), ("error", pa.string()),
    ("skip", pa.bool_()), ("address", pa.string()), ("data", pa.binary()),
])  # fmt: skip
# ...and from the prepare stage to the actors: prepared pixels instead of the file bytes.
PREPARED_SCHEMA = pa.schema([
    *[f for f in RECORD_SCHEMA if f.name != "data"],
    ("prep_width", pa.int32()), ("prep_height", pa.int32()),  # original size (after EXIF orientation)
    ("pixels", pa.binary()), ("pixel_width", pa.int32()), ("pixel_height", pa.int32()),  # RGB, resized
    ("data", pa.binary()),  # the original bytes, only kept with --embed-images
])  # fmt: skip
OUT_SCHEMA = pa.schema([*CAPTION_SCHEMA, pa.field("skip", pa.bool_())])


# --- units: the driver's listing, from the image layer (shards.images) ----------------------------


def list_units(srcs) -> list[dict]:
    """Work units for the read tasks, in the order shards.images.iter_sources yields items:
    chunks of plain image files, one unit per tar, one per Parquet file (same keys, same
    addresses as the local engine: both come from shards.images.iter_entries)."""
    units: list[dict] = []
    files: list[dict] = []
    for entry in iter_entries(srcs):  # UserError for a missing or unknown source, before any work
        if entry.kind == "file":
            files.append(asdict(entry))
            if len(files) < FILES_PER_UNIT:
                continue
        if files:  # keep the input order
            units.append({"kind": "files", "entries": files})
            files = []
        if entry.kind != "file":
            units.append({"kind": "entry", "entry": asdict(entry)})
    if files:
        units.append({"kind": "files", "entries": files})
    return units


# --- stage 1: read (CPU tasks) -----------------------------------------------------------------


def _unit_items(unit: dict) -> Iterator[ImageItem]:
    """A unit's items; tar members and Parquet rows come with their bytes, plain files are read
    by address in the prepare stage."""
    entries = unit["entries"] if unit["kind"] == "files" else [unit["entry"]]
    for d in entries:
        yield from iter_entry(SourceEntry(**d))


def read_units(batch: pa.Table, skip_keys) -> Iterator[pa.Table]:
    """map_batches UDF: units in, image records out (tar/Parquet bytes read here, files later).
    `skip_keys`: keys already done (a frozenset, or an ObjectRef of one)."""
    skip_keys = fetch_once(skip_keys)
    for unit_json in batch.column("unit").to_pylist():
        records: list[dict] = []
        for it in _unit_items(json.loads(unit_json)):
            skip = it.key in skip_keys
            records.append(dict(
                key=it.key, source=it.source, member=it.member, image_id=it.image_id, width=it.width,
                height=it.height, alt_text=it.alt, error=it.error, skip=skip, address=it.address,
                data=None if skip else it.data,
            ))  # fmt: skip
            if len(records) >= RECORDS_PER_BLOCK:
                yield pa.Table.from_pylist(records, RECORD_SCHEMA)
                records = []
        if records:
            yield pa.Table.from_pylist(records, RECORD_SCHEMA)


# --- stage 2: prepare (CPU tasks) --------------------------------------------------------------


def prepare_records(batch: pa.Table, opts: PrepareOptions, embed_images: bool) -> pa.Table:
    """map_batches UDF: decode + resize each image exactly as the local engine's workers do."""
    from autolabel.pipeline import _prepare

    out = []
    for r in batch.to_pylist():
        row = {k: r[k] for k in ("key", "source", "member", "address", "image_id", "width", "height", "alt_text", "error", "skip")}
        if not r["skip"]:
            item = ImageItem(key=r["key"], source=r["source"], member=r["member"], data=r["data"], address=r["address"],
                             alt=r["alt_text"], image_id=r["image_id"], width=r["width"], height=r["height"], error=r["error"])  # fmt: skip
            _, prep, error, data = _prepare(item, opts)
            row["error"] = error
            if prep is not None:
                row.update(prep_width=prep.width, prep_height=prep.height, pixels=prep.image.tobytes(),
                           pixel_width=prep.image.width, pixel_height=prep.image.height)  # fmt: skip
            row["data"] = data if embed_images else None
        out.append(row)
    return pa.Table.from_pylist(out, PREPARED_SCHEMA)


# --- stage 3: caption (actors) -----------------------------------------------------------------


class CaptionActor:
    """One model replica: the project's own captioner, loaded once per actor, captioning with
    the local engine's per-batch function (autolabel.pipeline.caption_batch)."""

    def __init__(self, cfg: CaptionConfig) -> None:
        from autolabel.backends import make_captioner

        self.captioner = make_captioner(cfg.backend, cfg.model, **cfg.captioner_kwargs())
        self.cfg, self.params = cfg, cfg.gen_params()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict] = []
        todo: list[tuple[dict, Image.Image]] = []
        for r in batch.to_pylist():
            if r["skip"]:
                out.append({"key": r["key"], "skip": True})
                continue
            row = base_row(self.captioner, self.params, r["data"] if self.cfg.embed_images else None, key=r["key"],
                           source=r["source"], member=r["member"], address=r["address"], image_id=r["image_id"],
                           width=r["width"] or r["prep_width"], height=r["height"] or r["prep_height"], alt_text=r["alt_text"])  # fmt: skip
            row.update(error=r["error"], skip=False)
            out.append(row)
            if r["pixels"] is not None and r["error"] is None:
                todo.append((row, Image.frombytes("RGB", (r["pixel_width"], r["pixel_height"]), r["pixels"])))
        if todo:
            caption_batch(self.captioner, self.cfg, todo)
        return pa.Table.from_pylist(out, OUT_SCHEMA)


# --- the driver --------------------------------------------------------------------------------


def caption_with_ray(cfg: CaptionConfig, run: Run) -> Summary:
    """Caption every not-yet-done image of `cfg.src` into `run`'s shards on Ray; see the module
    docstring."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    ray = import_ray()
    srcs = cfg.src
    if not srcs:
        raise UserError("no --src given: pass a folder, SA-1B .tar or .parquet with images")
    units = list_units(srcs)  # UserError for a missing or unreadable source, before any work
    if not units:
        raise UserError(f"no images found in --src {', '.join(map(str, srcs))}: pass folders, .tar or .parquet files with images")
    total = count_items(srcs) if cfg.progress else None
    # images are prepared at the model's input size, as in the local engine (autolabel.sizing)
    processor = _load_processor(cfg.model)
    set_pixel_limits(processor, *(pixel_limits(processor, cfg.min_pixels, cfg.max_pixels) or (None, None)))
    prepare_opts = cfg.prepare_options(size_policy(processor))
    run.settings["size_policy"] = prepare_opts.policy.why
    rec = RunRecorder(run, cfg.retry_failed)
    skip_keys = rec.skip_keys
    with ray_session(cfg.ray_address):
        resources = actor_resources(ray.cluster_resources(), cfg.replicas)
        # one block per unit (capped), so read tasks spread over the cluster
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=min(len(units), 10_000))
        ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                            fn_kwargs={"skip_keys": ray.put(skip_keys) if skip_keys else skip_keys})  # fmt: skip
        ds = ds.map_batches(prepare_records, batch_size=cfg.batch_size, batch_format="pyarrow",
                            fn_kwargs={"opts": prepare_opts, "embed_images": cfg.embed_images}, num_cpus=0.5)  # fmt: skip
        ds = ds.map_batches(CaptionActor, batch_size=cfg.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=cfg.replicas), fn_constructor_kwargs={"cfg": cfg},
                            **resources)  # fmt: skip

        columns = [TextColumn("captioning (ray)"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, disable=not cfg.progress, transient=False) as bar:
            task = bar.add_task("caption", total=total, rate="0.00")
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    if not rec.first_sight(row["key"]):
                        continue  # the same key twice in the input: keep the first
                    if row.pop("skip"):
                        rec.summary.skipped += 1
                        bar.advance(task)
                        continue
                    rec.emit(row)
                    bar.update(task, advance=1, rate=rec.rate())
    return rec.finish()
