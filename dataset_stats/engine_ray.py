"""`--engine ray`: noun tagging as a Ray Data `map_batches` over the captions.

Each Ray worker process loads the spaCy model once (cached per process; plain tasks rather
than an actor pool, because actors holding every CPU starve Ray's read tasks on a small
machine and the job deadlocks) and returns, per row, its state
(ok / null / empty / dropped by --lang en), its nouns (space-joined: a noun token never holds
whitespace, so the join is lossless), its word count, and whether it is non-English and was
split into pieces. The driver merges them, in order, into the same accumulator the local
engine uses, so both engines give identical numbers. Imported only when `--engine ray` is used.
"""

from __future__ import annotations

from typing import Callable, Optional

import pyarrow as pa

from dataset_stats.metrics import NounAccumulator
from dataset_stats.nouns import NounConfig, NounExtractor
from dataset_stats.readers import CaptionSource, detect_format, iter_caption_batches, parquet_column
from shards import fs as shard_fs

OK, NULL, EMPTY, DROPPED = 0, 1, 2, 3
CAPTION = "caption"


_extractors: dict[NounConfig, NounExtractor] = {}  # per Ray worker process: the model loads once


def tag_batch(batch: pa.Table, config: NounConfig, column: str) -> pa.Table:
    """The map_batches UDF: a table with the caption column in, per-row noun results out."""
    extractor = _extractors.get(config)
    if extractor is None:
        extractor = _extractors[config] = NounExtractor(config)
    values = batch.column(column).to_pylist()
    states, texts = [], []
    for v in values:
        if v is None:
            states.append(NULL)
        elif not v.strip():
            states.append(EMPTY)
        else:
            states.append(OK)
            texts.append(v)
    result = extractor.extract(texts)
    nouns, words, foreign, split = [], [], [], []
    pos, k, t = 0, 0, 0  # position in result.nouns, kept caption, input text
    for i, state in enumerate(states):
        if state != OK:
            nouns.append("")
            words.append(0)
            foreign.append(False)
            split.append(False)
            continue
        foreign.append(result.foreign[t])
        split.append(result.split[t])
        if result.kept[t]:
            n = result.lengths[k]
            nouns.append(" ".join(result.nouns[pos : pos + n]))
            words.append(result.words[k])
            pos += n
            k += 1
        else:
            states[i] = DROPPED
            nouns.append("")
            words.append(0)
        t += 1
    return pa.table({
        "state": pa.array(states, pa.int8()), "nouns": nouns, "words": pa.array(words, pa.int32()),
        "foreign": pa.array(foreign, pa.bool_()), "split": pa.array(split, pa.bool_()),
    })  # fmt: skip


def _parquet_paths(source: CaptionSource) -> tuple[list[str], dict]:
    """Paths and kwargs for ray.data.read_parquet. URIs (s3://, gs://, fsspec schemes) come with
    the pyarrow filesystem shards.fs resolved for them, so fsspec-only schemes work too."""
    uris = [f for f in source.files if isinstance(f, str)]
    if not uris:
        return [str(f) for f in source.files], {}
    resolved = [shard_fs.resolve(f) for f in source.files]  # one source: one directory, one filesystem
    return [path for _, path in resolved], {"filesystem": resolved[0][0]}


def _dataset(source: CaptionSource, chunk_size: int, workers: int):
    """Parquet inputs: ray.data.read_parquet (streamed by Ray). Other formats, and files on a
    filesystem only this process sees (memory://): our readers, handed to Ray as Arrow blocks
    (these sit in Ray's object store)."""
    import ray.data

    readable_by_workers = not any(shard_fs.is_process_local(f) for f in source.files if isinstance(f, str))
    if readable_by_workers and all(detect_format(f) == "parquet" for f in source.files):
        columns = {parquet_column(f, source) for f in source.files}
        if len(columns) == 1:
            column = columns.pop()
            # enough blocks that every worker gets some, even from a single-file input
            blocks = max(workers * 2, min((source.known_rows() or 0) // chunk_size, 10_000))
            paths, kwargs = _parquet_paths(source)
            ds = ray.data.read_parquet(paths, override_num_blocks=blocks, **kwargs)
            if len(source.files) < workers:  # one row group cannot be split at read time
                ds = ds.repartition(blocks)
            return ds.select_columns([column]), column
    blocks = [pa.table({CAPTION: pa.array(b, pa.string())}) for b in iter_caption_batches(source, chunk_size)]
    if not blocks:
        blocks = [pa.table({CAPTION: pa.array([], pa.string())})]
    return ray.data.from_arrow(blocks), CAPTION


def count_with_ray(
    source: CaptionSource,
    config: NounConfig,
    acc: NounAccumulator,
    workers: int,
    chunk_size: int,
    address: Optional[str] = None,
    advance: Callable[[NounAccumulator], None] = lambda acc: None,
) -> None:
    """Tag `source` with Ray actors and merge the results into `acc`, in input order."""
    from shards.ray_session import ray_session

    with ray_session(address, num_cpus=workers) as ray:
        ds, column = _dataset(source, chunk_size, workers)
        tagged = ds.map_batches(
            tag_batch,
            fn_kwargs={"config": config, "column": column},
            batch_size=chunk_size,
            batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=workers),
            num_cpus=1,
        )
        for batch in tagged.iter_batches(batch_format="pyarrow", batch_size=None):
            _merge(batch, acc)
            advance(acc)


def _merge(batch: pa.Table, acc: NounAccumulator) -> None:
    states = batch.column("state").to_pylist()
    joined = batch.column("nouns").to_pylist()
    words = batch.column("words").to_pylist()
    foreign = batch.column("foreign").to_pylist()
    split = batch.column("split").to_pylist()
    acc.rows += len(states)
    analysed = [s in (OK, DROPPED) for s in states]
    acc.add_flags(
        [f for f, a in zip(foreign, analysed) if a],
        [s == OK for s, a in zip(states, analysed) if a],
        [x for x, a in zip(split, analysed) if a],
    )
    flat: list[str] = []
    lengths: list[int] = []
    kept_words: list[int] = []
    for state, j, w in zip(states, joined, words):
        if state == NULL:
            acc.null += 1
        elif state == EMPTY:
            acc.empty += 1
        elif state == OK:
            nouns = j.split(" ") if j else []
            flat.extend(nouns)
            lengths.append(len(nouns))
            kept_words.append(w)
    if lengths:
        acc.add_result(flat, lengths, kept_words)
