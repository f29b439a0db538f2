"""`--engine ray`: the score job as a Ray Data `map_batches` over the caption rows.

Ray tasks read the caption shards (`ray.data.read_parquet`), and each worker process loads the
scorers once (cached per process; CLIP on the task's GPU: each task requests one on a GPU
cluster) and calls the same per-batch function as the local engine,
`curate.scorers.score_batch`. Keys already scored are dropped inside the tasks. The driver is
the single writer: rows come back in input order through `iter_batches` into the local engine's
ShardWriter, so shards, done markers, resume and the dedup pass are the local engine's. Each
block also carries the seconds its scorers took (`SECONDS`, a JSON column set on its first row),
which the driver adds up for the ledger and drops.
Imported only when `--engine ray` is used.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc


_loaded: dict[tuple, object] = {}  # per Ray worker process: models load once
SECONDS = "_scorer_seconds"  # the transport column of each block's scorer seconds


def score_block(batch: pa.Table, spec: tuple, done: pa.Array) -> pa.Table:
    """The map_batches UDF: caption rows in, score rows (the scorers' schema) out."""
    from curate.scorers import Scorers, score_batch
    from shards.schema import rows_to_table

    scorers = _loaded.get(spec)
    if scorers is None:
        names, clip_model, weights, decode_short, refs = spec
        scorers = _loaded[spec] = Scorers.load(list(names), clip_model, weights, refs=refs, decode_short=decode_short, workers=1)
    if len(done):
        batch = batch.filter(pc.invert(pc.is_in(batch.column("key"), value_set=done)))
    before = dict(scorers.seconds)
    table = rows_to_table(score_batch(batch.to_pylist(), scorers), scorers.schema)
    spent = json.dumps({k: v - before.get(k, 0.0) for k, v in scorers.seconds.items()})
    return table.append_column(SECONDS, pa.array([spent] + [None] * (table.num_rows - 1), pa.string())[: table.num_rows])


def score_with_ray(paths: list[str], columns: list[str], spec: tuple, done: set[str], batch_size: int,
                   replicas: int, address: str | None) -> Iterator[tuple[list[dict], dict[str, float]]]:
    """Score rows of the caption shards at `paths` on Ray; yields (score rows, the seconds each
    scorer took on them), in order."""
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
                seconds: dict[str, float] = {}
                for spent in block.column(SECONDS).drop_null().to_pylist():
                    for name, v in json.loads(spent).items():
                        seconds[name] = seconds.get(name, 0.0) + v
                yield block.drop_columns([SECONDS]).to_pylist(), seconds
