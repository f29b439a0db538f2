"""The training data path: a torch DataLoader over StreamingFeatureDataset, one rank's slice of
each global batch at a time, in the deterministic order of global_batches().

    for b in make_loader(ds, epoch, seed, global_batch, rank, world_size, start_batch=pos):
        ...  # b: t2i.data.Batch with b.epoch, b.batch_pos, b.last_in_epoch, b.caption_fields

With several caption fields, the sampler also draws each sample's field (pick_fields: from
seed, epoch and sample), so the workers read only that field's text.

Workers (processes) read row groups ahead and write each batch into a slot of a shared-memory
ring that the training process maps once: a batch costs no fresh memory (whose page faults cost
more than the copy itself) and no copy between processes. A Batch handed out holds its slot
until its tensors are dropped; a worker that finds none of its slots free falls back to fresh
shared tensors, so holding batches is always safe. With pinned memory the slot is copied into
page-locked memory on the DataLoader's pin thread and freed at once.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from shards import ShardError
from t2i.data import Batch, RowLayout, StreamingFeatureDataset, mask_of


class BatchRequest(NamedTuple):
    """What the sampler hands a loader worker: one rank's slice of one global batch."""

    epoch: int
    batch_pos: int
    indices: np.ndarray
    last_in_epoch: bool
    field_ids: np.ndarray  # the caption field each sample trains on (StreamingFeatureDataset.pick_fields)


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
                yield BatchRequest(epoch, p, idx, i == len(todo) - 1, self.dataset.pick_fields(idx, self.seed, epoch))
            epoch, start = epoch + 1, 0


class SlotRing:
    """`workers` x `per_worker` batch buffers in one shared-memory block (created before the
    workers fork, so every process maps the same pages), and a shared free flag per slot.
    Worker w only claims its own slots; the training process only frees them."""

    def __init__(self, workers: int, per_worker: int, share: int, text_row_bytes: int, latent_bytes: int,
                 teacher_bytes: int = 0) -> None:
        self.id = next(_RING_IDS)
        _RINGS[self.id] = self  # the training process finds its own mapping by id (see SlotBatch)
        self.per_worker = per_worker
        self.parts = {"text": share * text_row_bytes, "mean": share * latent_bytes, "std": share * latent_bytes,
                      "teacher": share * teacher_bytes}
        self.slot_bytes = sum(self.parts.values())
        slots = max(workers, 1) * per_worker
        # pages are only backed once written: an unused slot costs nothing
        self.storage = torch.UntypedStorage._new_shared(slots * self.slot_bytes)
        self.free = torch.ones(slots, dtype=torch.uint8).share_memory_()
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def _bytes(self) -> np.ndarray:
        if self._array is None:
            self._array = torch.tensor([], dtype=torch.uint8).set_(self.storage).numpy()
        return self._array

    def claim(self) -> int | None:
        """A free slot of this worker (marked taken), or None."""
        info = torch.utils.data.get_worker_info()
        first = (info.id if info is not None else 0) * self.per_worker
        free = self.free.numpy()
        for s in range(first, first + self.per_worker):
            if free[s]:
                free[s] = 0
                return s
        return None

    def release(self, slot: int) -> None:
        self.free.numpy()[slot] = 1

    def views(self, slot: int, n: int, max_tokens: int, layout: RowLayout, lease: bool = False) -> dict[str, np.ndarray]:
        """Raw byte views of slot `slot` for a batch of n: text (n, max_tokens, row bytes), mean,
        std (n, latent bytes) and teacher (n, teacher bytes; None when not read). With `lease`,
        the slot is freed when the last view (and every tensor made from it) is gone."""
        raw = self._bytes()[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]
        if lease:
            raw = raw.view(_Lease)
            weakref.finalize(raw, self.release, slot)
        row = layout.channels * layout.text_dtype.itemsize
        latent = int(np.prod(layout.latent_shape)) * layout.latent_dtype.itemsize
        t_end, m_end = n * max_tokens * row, self.parts["text"] + n * latent
        s_start = self.parts["text"] + self.parts["mean"]
        teacher = raw[s_start + self.parts["std"] :][: n * layout.teacher_bytes].reshape(n, -1) if layout.teacher else None
        return {"text": raw[:t_end].reshape(n, max_tokens, row), "mean": raw[self.parts["text"] : m_end].reshape(n, latent),
                "std": raw[s_start:][: n * latent].reshape(n, latent), "teacher": teacher}


_RINGS: weakref.WeakValueDictionary[int, SlotRing] = weakref.WeakValueDictionary()
_RING_IDS = itertools.count()


class _Lease(np.ndarray):
    """A numpy view that frees its ring slot when garbage-collected (weakref.finalize)."""


@dataclass
class SlotBatch:
    """A batch written into a ring slot by a worker: sent back as this small record (the bytes
    are already in shared memory), turned into a Batch in the training process, over the
    ring's mapping there (found by id: the record carries no handle to map again)."""

    ring_id: int
    slot: int
    layout: RowLayout
    keys: list[str]
    lens: np.ndarray
    max_tokens: int
    request: BatchRequest
    caption_fields: list[str]

    def batch(self) -> Batch:
        n, lay = len(self.keys), self.layout
        v = _RINGS[self.ring_id].views(self.slot, n, self.max_tokens, lay, lease=True)
        text = torch.from_numpy(v["text"]).view(lay.text_dtype).view(n, self.max_tokens, lay.channels)
        rows, cols, channels = lay.teacher or (0, 0, 0)
        teacher = torch.from_numpy(v["teacher"]).view(lay.teacher_dtype).view(n, rows * cols, channels) if lay.teacher else None
        return Batch(keys=self.keys, latent_mean=torch.from_numpy(v["mean"]).view(lay.latent_dtype).view(n, *lay.latent_shape),
                     latent_std=torch.from_numpy(v["std"]).view(lay.latent_dtype).view(n, *lay.latent_shape), text=text,
                     mask=mask_of(self.lens, self.max_tokens), height=lay.height, width=lay.width, epoch=self.request.epoch,
                     batch_pos=self.request.batch_pos, last_in_epoch=self.request.last_in_epoch, caption_fields=self.caption_fields,
                     teacher=teacher, teacher_grid=(rows, cols))

    def pin_memory(self) -> Batch:
        """On the DataLoader's pin thread: copied into page-locked memory; the slot frees at once."""
        return self.batch().pin_memory()


class RingReader(torch.utils.data.Dataset):
    """What the DataLoader workers run: read one BatchRequest into a free ring slot (or, with
    none free, into fresh shared tensors)."""

    def __init__(self, dataset: StreamingFeatureDataset, ring: SlotRing | None) -> None:
        self.dataset, self.ring = dataset, ring

    def __getitem__(self, request: BatchRequest) -> Batch | SlotBatch:
        ds = self.dataset
        reads, layout = ds.read(request.indices, request.field_ids)
        slot = self.ring.claim() if self.ring is not None else None
        if slot is None:
            b = ds.get_from(reads, layout, len(request.indices))
            b.epoch, b.batch_pos, b.last_in_epoch = request.epoch, request.batch_pos, request.last_in_epoch
            return b
        try:
            v = self.ring.views(slot, len(request.indices), ds.max_tokens, layout)
            keys, lens, names = ds.fill(reads, v["text"], v["mean"], v["std"], v["teacher"])
        except BaseException:
            self.ring.release(slot)
            raise
        return SlotBatch(self.ring.id, slot, layout, keys, lens, ds.max_tokens, request, names)


class FeatureLoader:
    """Iterable of Batch (see make_loader): the DataLoader, with ring slots turned into Batches."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:
            yield item.batch() if isinstance(item, SlotBatch) else item


def make_loader(dataset: StreamingFeatureDataset, epoch: int, seed: int, global_batch: int, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, workers: int = 2, pin_memory: bool | None = None, epochs: int | None = 1,
                prefetch: int = 2) -> FeatureLoader:
    """This rank's Batch of each non-empty global batch, in order, from (epoch, start_batch) on,
    for `epochs` epochs (None: endlessly). `workers` processes read ahead, `prefetch` batches
    each (0: read in this process); batches come in pinned memory when `pin_memory` (default:
    when CUDA is available). Each Batch carries its epoch, batch_pos and last_in_epoch."""
    sampler = GlobalBatchSampler(dataset, seed, global_batch, rank, world_size, epoch, start_batch, epochs)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    # slots per worker: its prefetched batches (in process: the one being read), plus the one
    # the training loop still holds while it asks for the next
    ring = _ring_for(dataset, global_batch // world_size, workers, (prefetch if workers else 1) + 1)
    loader = torch.utils.data.DataLoader(
        RingReader(dataset, ring), sampler=sampler, batch_size=None, num_workers=workers, pin_memory=pin,
        prefetch_factor=prefetch if workers else None, collate_fn=_as_is,
        # its own generator: creating the loader must not draw from torch's global RNG, which
        # the training run's exact resume restores and depends on
        generator=torch.Generator().manual_seed(seed))
    return FeatureLoader(loader)


def _ring_for(dataset: StreamingFeatureDataset, share: int, workers: int, per_worker: int) -> SlotRing:
    """A ring whose slots fit `share` samples of the largest bucket (one row read per bucket)."""
    layouts = [dataset.read(idx[:1])[1] for idx in dataset.buckets.values() if len(idx)]
    row = max(lay.channels * lay.text_dtype.itemsize for lay in layouts)
    latent = max(int(np.prod(lay.latent_shape)) * lay.latent_dtype.itemsize for lay in layouts)
    return SlotRing(workers, per_worker, share, dataset.max_tokens * row, latent, max(lay.teacher_bytes for lay in layouts))


def _as_is(item):
    return item
