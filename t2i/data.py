"""Feature-shard dataset, streamed: bucketed batches (one bucket per batch), a deterministic epoch
order and a data position (epoch, batch) that a resumed run continues from exactly, on any number
of processes with the same global batch (each rank reads only its slice of a global batch).

Only an index is held in memory: for every sample (in key order) its bucket, shard, row group and
row, in numpy arrays (~12 bytes a sample, read from the key/height/width columns alone). Tensor
columns are read on demand, one Parquet row group at a time (shards.ShardWriter keeps row groups
near 1 MiB, about one sample of T5-XXL features), and copied straight from the Arrow binary
buffers into the batch tensors: no Python object per row. `make_loader` runs the reads in
torch DataLoader workers with prefetch and pinned memory.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from shards import ShardError, complete_shards

TENSOR_COLUMNS = ["key", "latent_shape", "latent_mean", "latent_std", "text_emb", "text_len", "text_channels", "text_dtype", "height", "width"]
INDEX_COLUMNS = ["key", "height", "width"]
OPEN_FILES = 64  # Parquet files kept open per process (footer parsed once, then reused)
BIG_ROW_GROUP = 64 << 20  # uncompressed bytes: bigger groups make every random row read costly


@dataclass
class Batch:
    keys: list[str]
    latent_mean: torch.Tensor  # (B, C, h, w) float32
    latent_std: torch.Tensor
    text: torch.Tensor  # (B, max_tokens, C) in the stored text dtype, zero-padded
    mask: torch.Tensor  # (B, max_tokens) long
    height: int  # pixel size of this bucket
    width: int
    epoch: int = 0  # data position of the global batch this is a slice of (set by make_loader)
    batch_pos: int = 0
    last_in_epoch: bool = False  # no non-empty global batch follows in this epoch

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread: the tensors moved to page-locked memory."""
        return Batch(**{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)})


class BatchRequest(NamedTuple):
    """What the sampler hands a loader worker: one rank's slice of one global batch."""

    epoch: int
    batch_pos: int
    indices: np.ndarray
    last_in_epoch: bool


class StreamingFeatureDataset(torch.utils.data.Dataset):
    """All complete feature shards of one directory, indexed; rows are read on demand.

    `ds[request]` (a BatchRequest or an index array) reads one batch: rows grouped by (shard,
    row group), so a batch costs one read per distinct row group it touches."""

    def __init__(self, features_dir: str | Path, max_tokens: int) -> None:
        self.features_dir = features_dir
        self.shards = [str(s) for s in complete_shards(features_dir)]
        if not self.shards:
            raise ShardError(f"no complete feature shards in {features_dir}: run `t2i-data features` first")
        self.max_tokens = max_tokens
        self._build_index()
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._pid = os.getpid()

    def _build_index(self) -> None:
        """shard/group/row of every sample in key order, and the samples of each bucket."""
        keys, hs, ws, shard, group, row = [], [], [], [], [], []
        for s, path in enumerate(self.shards):
            pf = pq.ParquetFile(path, memory_map=True)
            md = pf.metadata
            sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], np.int64)
            if md.num_rows > 1 and (md.num_row_groups == 1 and md.row_group(0).total_byte_size > BIG_ROW_GROUP):
                warnings.warn(f"{path} is one {md.row_group(0).total_byte_size >> 20} MiB row group: every sample read decodes all of it; "
                              "rewrite the features with this version (small row groups) for fast training", stacklevel=3)
            t = pf.read(columns=INDEX_COLUMNS)
            keys.append(t.column("key"))
            hs.append(t.column("height").to_numpy())
            ws.append(t.column("width").to_numpy())
            shard.append(np.full(md.num_rows, s, np.int32))
            group.append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
            starts = np.cumsum(sizes) - sizes
            row.append((np.arange(md.num_rows) - np.repeat(starts, sizes)).astype(np.int32))
        # a stable order independent of shard write order: sort by key (Arrow, no Python strings)
        order = pc.sort_indices(pa.chunked_array([c for k in keys for c in k.chunks], pa.string())).to_numpy()
        self.shard = np.concatenate(shard)[order]
        self.group = np.concatenate(group)[order]
        self.row = np.concatenate(row)[order]
        hw = np.stack([np.concatenate(hs)[order], np.concatenate(ws)[order]], 1)
        self.buckets: dict[tuple[int, int], np.ndarray] = {}
        for b in sorted({tuple(x) for x in np.unique(hw, axis=0).tolist()}):
            self.buckets[b] = np.flatnonzero((hw[:, 0] == b[0]) & (hw[:, 1] == b[1]))

    def __len__(self) -> int:
        return len(self.shard)

    def global_batches(self, epoch: int, seed: int, global_batch: int, world_size: int = 1) -> list[np.ndarray]:
        """The global batches of one epoch, one bucket each, in an order fixed by (seed, epoch,
        global_batch) alone: the same list on any number of processes, so a data position (epoch,
        batch index) means the same samples after a resume on another world size.

        Each bucket's last, incomplete batch is cut to a multiple of `world_size` so every rank
        gets an equal share (it may become empty: callers skip empty entries). With one process
        every sample appears exactly once; with W, at most W-1 samples per bucket wait for the
        next epoch's shuffle."""
        rng = np.random.default_rng([seed, epoch])
        batches = []
        for b, idx in self.buckets.items():
            idx = rng.permutation(idx)
            for s in range(0, len(idx), global_batch):
                chunk = idx[s : s + global_batch]
                batches.append(chunk[: len(chunk) - len(chunk) % world_size])
        order = rng.permutation(len(batches))
        return [batches[i] for i in order]

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, world_size: int = 1) -> list[np.ndarray]:
        """The non-empty global batches (batch_size x world_size indices) of `global_batches`."""
        return [b for b in self.global_batches(epoch, seed, batch_size * world_size, world_size) if len(b)]

    @staticmethod
    def rank_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s contiguous, equal share of a global batch (positions rank*share ...)."""
        share = len(batch) // world_size
        return batch[rank * share : (rank + 1) * share]

    def __getitem__(self, request: BatchRequest | np.ndarray) -> Batch:
        if isinstance(request, BatchRequest):
            b = self.get(request.indices)
            b.epoch, b.batch_pos, b.last_in_epoch = request.epoch, request.batch_pos, request.last_in_epoch
            return b
        return self.get(np.asarray(request))

    def get(self, indices: np.ndarray) -> Batch:
        """The samples `indices` (positions in key order, all of one bucket) as one Batch."""
        indices = np.asarray(indices)
        if not len(indices):
            raise ValueError("an empty batch has no bucket")
        reads = self._read_groups(indices)
        first, r0 = reads[0][1], reads[0][2][0]
        shape = first.column("latent_shape")[r0].as_py()
        channels = first.column("text_channels")[r0].as_py()
        text_dtype = getattr(torch, first.column("text_dtype")[r0].as_py())
        n = len(indices)
        means = _empty((n, *shape), torch.float32)
        stds = _empty((n, *shape), torch.float32)
        text = _empty((n, self.max_tokens, channels), text_dtype)
        lens = np.zeros(n, np.int64)
        keys: list[str] = [""] * n
        row_bytes = channels * text.element_size()
        text_raw = text.view(n, -1).view(torch.uint8).numpy().reshape(n, self.max_tokens, row_bytes)
        for positions, table, rows in reads:
            _copy_rows(table.column("latent_mean"), rows, means.view(n, -1).view(torch.uint8).numpy(), positions)
            _copy_rows(table.column("latent_std"), rows, stds.view(n, -1).view(torch.uint8).numpy(), positions)
            lens[positions] = np.minimum(table.column("text_len").to_numpy()[rows], self.max_tokens)
            _copy_text(table.column("text_emb"), rows, lens[positions], text_raw, positions, row_bytes)
            for p, k in zip(positions, table.column("key").take(pa.array(rows)).to_pylist()):
                keys[p] = k
        mask = (torch.arange(self.max_tokens) < torch.from_numpy(lens)[:, None]).long()
        return Batch(keys=keys, latent_mean=means, latent_std=stds, text=text, mask=mask,
                     height=first.column("height")[r0].as_py(), width=first.column("width")[r0].as_py())

    def _read_groups(self, indices: np.ndarray) -> list[tuple[np.ndarray, pa.Table, np.ndarray]]:
        """(batch positions, row-group table, rows in it) for each distinct (shard, row group)."""
        shard, group, row = self.shard[indices], self.group[indices], self.row[indices]
        unit = shard.astype(np.int64) << 32 | group
        reads = []
        for u in np.unique(unit):
            positions = np.flatnonzero(unit == u)
            table = self._file(int(u >> 32)).read_row_group(int(u & 0xFFFFFFFF), columns=TENSOR_COLUMNS)
            reads.append((positions, table.combine_chunks(), row[positions]))
        return reads

    def _file(self, s: int) -> pq.ParquetFile:
        """Shard `s`, opened lazily per process (a forked loader worker opens its own)."""
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
        else:
            self._files[s] = pq.ParquetFile(self.shards[s], memory_map=True)
            if len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)
        return self._files[s]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # open files stay with their process


def _binary_views(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) numpy views over a one-chunk binary column's Arrow buffers: no copy."""
    (arr,) = column.chunks
    _, offs, data = arr.buffers()
    offsets = np.frombuffer(offs, np.int32)[arr.offset : arr.offset + len(arr) + 1]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def _copy_rows(column: pa.ChunkedArray, rows: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
    """out[positions[i]] = the bytes of row rows[i] (every row the same size as out's rows)."""
    offsets, data = _binary_views(column)
    for p, r in zip(positions, rows):
        out[p] = data[offsets[r] : offsets[r + 1]]


def _copy_text(column: pa.ChunkedArray, rows: np.ndarray, lens: np.ndarray, out: np.ndarray, positions: np.ndarray, row_bytes: int) -> None:
    """The first lens[i] token rows of each text embedding into out[positions[i]] (zero-padded)."""
    offsets, data = _binary_views(column)
    for p, r, n in zip(positions, rows, lens):
        start = offsets[r]
        out[p, :n] = data[start : start + n * row_bytes].reshape(n, row_bytes)
        out[p, n:] = 0


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, allocated in shared memory right away, so
    handing it to the training process costs no copy (what default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's slices of the non-empty global batches, from (epoch, start_batch) on, for
    `epochs` epochs (None: endlessly). The order is global_batches(): fixed by (seed, epoch,
    global_batch), the same on any world size."""

    def __init__(self, dataset: StreamingFeatureDataset, seed: int, global_batch: int, rank: int, world_size: int,
                 epoch: int = 0, start_batch: int = 0, epochs: int | None = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if all(len(idx) < world_size for idx in dataset.buckets.values()):
            raise ShardError(f"no full batch of {global_batch} samples in {dataset.features_dir}: lower batch_size / global_batch")
        self.dataset, self.seed, self.global_batch, self.rank, self.world_size = dataset, seed, global_batch, rank, world_size
        self.epoch, self.start_batch, self.epochs = epoch, start_batch, epochs

    def __iter__(self) -> Iterator[BatchRequest]:
        epoch, start = self.epoch, self.start_batch
        while self.epochs is None or epoch < self.epoch + self.epochs:
            batches = self.dataset.global_batches(epoch, self.seed, self.global_batch, self.world_size)
            todo = [p for p in range(start, len(batches)) if len(batches[p])]
            for i, p in enumerate(todo):
                idx = StreamingFeatureDataset.rank_slice(batches[p], self.rank, self.world_size)
                yield BatchRequest(epoch, p, idx, i == len(todo) - 1)
            epoch, start = epoch + 1, 0


def make_loader(dataset: StreamingFeatureDataset, epoch: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, workers: int = 2, pin_memory: bool | None = None, epochs: int | None = 1,
                prefetch: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader yielding this rank's Batch of each non-empty global batch, in order, from
    (epoch, start_batch) on, for `epochs` epochs (None: endlessly). `workers` processes read
    ahead (`prefetch` batches each; 0: read in this process); batches come in pinned memory when
    `pin_memory` (default: when CUDA is available). Each Batch carries its epoch and batch_pos."""
    sampler = GlobalBatchSampler(dataset, seed, global_batch, rank, world_size, epoch, start_batch, epochs)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=workers, pin_memory=pin,
        prefetch_factor=prefetch if workers else None, collate_fn=_as_is,
        # its own generator: creating the loader must not draw from torch's global RNG, which
        # the training run's exact resume restores and depends on
        generator=torch.Generator().manual_seed(seed))


def _as_is(batch: Batch) -> Batch:
    return batch
