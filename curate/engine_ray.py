"""`--engine ray`: the score job as a Ray Data `map_batches` over the caption rows.

Ray tasks read the caption shards (`ray.data.read_parquet`), and each worker process loads the
scorers once (cached per process; CLIP on the task's GPU: each task requests one on a GPU
cluster) and calls the same per-batch function as the local engine,
`curate.scorers.score_batch`. Keys already scored are dropped inside the tasks. The driver is
the single writer: rows come back in input order through `iter_batches` into the local engine's
ShardWriter, so shards, done markers, resume and the dedup pass are the local engine's.
Imported only when `--engine ray` is used.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc


_loaded: dict[tuple, object] = {}  # per Ray worker process: models load once


def score_block(batch: pa.Table, spec: tuple, done: pa.Array) -> pa.Table:
    """The map_batches UDF: caption rows in, score rows (the scorers' schema) out."""
    from curate.scorers import Scorers, score_batch
    from shards.schema import rows_to_table

    scorers = _loaded.get(spec)
    if scorers is None:
        names, clip_model, weights, decode_short = spec
        scorers = _loaded[spec] = Scorers.load(list(names), clip_model, weights, decode_short=decode_short, workers=1)
    if len(done):
        batch = batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=done)))
    return rows_to_table(score_batch(batch.to_pylist(), scorers), scorers.schema)


def score_with_ray(paths: list[str], columns: list[str], spec: tuple, done: set[str], batch_size: int,
                   replicas: int, address: str | None) -> Iterator[list[dict]]:
    """Score rows of the caption shards at `paths` on Ray; yields lists of score rows in order."""
    from shards.ray_session import ray_session

    with ray_session(address, num_cpus=max(1, replicas)) as ray:
        ds = ray.data.read_parquet(paths).select_columns(columns)
        if len(paths) < 2 * replicas:  # one shard is one block: split it so every replica gets work
            ds = ds.repartition(2 * replicas)
        gpus = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {}  # CLIP on a GPU each, as caption's actors
        scored = ds.map_batches(score_block, fn_kwargs={"spec": spec, "done": pa.array(sorted(done), pa.string())},
                                batch_size=batch_size, batch_format="pyarrow", concurrency=replicas, **gpus)  # fmt: skip
        for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            if block.num_rows:
                yield block.to_pylist()
