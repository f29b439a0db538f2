"""`t2i-data features --engine ray`: the features job data-parallel over a Ray cluster.

    caption shards (one read task each: rows not yet done, blocks of ROWS_PER_BLOCK)
      -> FeatureActor (one per replica, a GPU each when the cluster has GPUs, else a CPU):
         t2i.features.encode_rows, the local engine's per-batch function (decode threads,
         batches of one size, VAE + T5), writing its own shards and failures
      -> driver: per-row status (encoded or failed), progress, then the manifest

- Each actor call takes `rows_per_shard` rows and commits them as its own shard (ShardWriter:
  atomic, done markers), so feature rows (MiBs each with T5-XXL) never pass through the driver.
  The features root must be reachable by every actor: a shared filesystem on a multi-node cluster.
- Resume: the keys already in complete shards (and those recorded as failures) go to the read
  tasks once through Ray's object store and are skipped there; a killed run loses at most the
  shards not yet committed, as in the local engine.
- The directory, its cache key, run record, manifest and failures are the local engine's (the
  driver runs the job skeleton, shards.job): either engine resumes the other's run.

Ray is imported only here, and this module only when `--engine ray` is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from shards import UserError
from shards import fs as shard_fs
from shards.job import Summary, job_run
from shards.ray_session import actor_resources, fetch_once, ray_session
from shards.reader import Shard, iter_rows
from shards.writer import ShardWriter
from t2i.caption_fields import DEFAULT_FIELDS
from t2i.feature_encoder import FeatureEncoder, encode_rows
from t2i.feature_images import RowImages
from t2i.text_codec import is_compact
from t2i.features import (
    FeatureConfig,
    caption_shards,
    count_row,
    feature_schema,
    feature_spec,
    features_dir,
    finish_output,
    read_failures,
    row_columns,
    start_output,
    unchanged_models,
    usable,
)

ROWS_PER_BLOCK = 64  # caption rows per block a read task yields (embedded images can be large)
STATUS_SCHEMA = pa.schema([("key", pa.string()), ("failed", pa.bool_())])


def row_schema(fields: tuple[str, ...]) -> pa.Schema:
    """The caption columns a read task hands the encoders (those of `fields` included)."""
    return pa.schema([(c, pa.binary() if c == "image" else pa.string()) for c in row_columns(fields)])


def read_todo_rows(batch: pa.Table, skip, fields: tuple[str, ...] = DEFAULT_FIELDS) -> Iterator[pa.Table]:
    """map_batches UDF: caption shards in, their usable rows not in `skip` out (a frozenset of
    keys, or an ObjectRef of one), with the columns of the caption `fields`."""
    skip, schema = fetch_once(skip), row_schema(fields)
    for shard in batch.column("shard").to_pylist():
        rows: list[dict[str, Any]] = []
        for r in iter_rows([shard], schema.names):
            if usable(r, fields) and r["key"] not in skip:
                rows.append(r)
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema)


class FeatureActor:
    """One encoder replica: the models load on its first batch; every call encodes its rows and
    commits them as its own shard(s)."""

    def __init__(self, out: str, cfg: FeatureConfig) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray shows a GPU actor its GPU only
        schema = feature_schema(cfg.caption_fields, bool(cfg.teacher), is_compact(cfg.text_dtype))
        writer = ShardWriter(Path(out), cfg.rows_per_shard, schema, prefix="features-ray")
        self.encoder = FeatureEncoder(writer, cfg, device)
        self.images = RowImages(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        keys = [r["key"] for r in rows]
        encode_rows(rows, self.images, self.encoder)
        return pa.Table.from_pydict({"key": keys, "failed": [k in self.encoder.failures for k in keys]}, STATUS_SCHEMA)


def _count(shards: list[Shard], skip: frozenset, stats: dict[str, Any], fields: tuple[str, ...] = DEFAULT_FIELDS) -> int:
    """Fill the summary counts (t2i.features.count_row) from the key, error and caption-field
    columns alone; returns how many usable rows are still to encode."""
    todo = 0
    for r in iter_rows(shards, ("key", "caption", "error", *fields)):
        if count_row(r, fields, stats):
            todo += r["key"] not in skip
    return todo


def compute_features_ray(shards_dir: str | Path, root: str | Path, cfg: FeatureConfig, address: str | None = None,
                         replicas: int | None = None, progress: bool = True) -> Summary:
    """compute_features (same directory, rows, failures and summary) on Ray: `replicas` encoder
    actors at `address` (default: the config's). See the module docstring."""
    from shards.ray_session import import_ray

    import_ray()  # the install hint before any work
    cfg.validate()
    address, replicas = address or cfg.ray_address, replicas or cfg.replicas
    if replicas < 1:
        raise UserError(f"--replicas {replicas} must be at least 1: pass a positive number")
    shards_dir = shard_fs.as_location(shards_dir)
    shards = caption_shards(shards_dir, cfg.caption_fields)
    out = features_dir(root, cfg)
    digests = unchanged_models(out, cfg)
    with job_run(feature_spec(cfg, out)) as run:  # the driver's device in the ledger; the actors' are not metered
        start_output(out, cfg, digests)
        skip = run.done | frozenset(read_failures(out))
        todo = _count(shards, skip, run.summary, cfg.caption_fields)
        if todo and run.summary.valid:  # a finished run starts no Ray
            run.summary.new = _encode_on_ray(shards, skip, todo, out, cfg, address, replicas, progress)
        return finish_output(run, cfg, shards_dir)


def _encode_on_ray(shards: list, skip: frozenset, todo: int, out: Path, cfg: FeatureConfig, address: str | None,
                   replicas: int, progress: bool) -> int:
    """Run the pipeline; returns the rows encoded."""
    from rich.progress import Progress

    new = 0
    with ray_session(address) as ray:
        ds = ray.data.from_items([{"shard": str(s.location)} for s in shards], override_num_blocks=min(len(shards), 10_000))
        ds = ds.map_batches(read_todo_rows, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                            fn_kwargs={"skip": ray.put(skip) if skip else skip, "fields": cfg.caption_fields})  # fmt: skip
        ds = ds.map_batches(FeatureActor, batch_size=cfg.rows_per_shard, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=replicas), fn_constructor_kwargs={"out": str(out), "cfg": cfg},
                            **actor_resources(ray.cluster_resources(), replicas))  # fmt: skip
        with Progress(disable=not progress) as bar:
            task = bar.add_task("features (ray)", total=todo)
            for status in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                new += status.num_rows - sum(status.column("failed").to_pylist())
                bar.advance(task, status.num_rows)
    return new
