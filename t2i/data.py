"""Feature-shard dataset, streamed: bucketed batches (one bucket per batch), a deterministic epoch
order and a data position (epoch, batch) that a resumed run continues from exactly, on any number
of processes with the same global batch (each rank reads only its slice of a global batch).

Only an index is held in memory: for every sample (in key order) its bucket, shard, row group and
row, in numpy arrays (~12 bytes a sample, read from the key/height/width columns alone; with
several caption fields, one more byte: which fields the sample has), built once and cached in the
features directory (t2i.feature_index: every later open, rank and run loads it instead). Tensor
columns are read on demand, one Parquet row group at a time (shards.ShardWriter keeps row groups
near 1 MiB, about one sample of T5-XXL features), and copied straight from the Arrow binary
buffers into the batch tensors: no Python object per row. t2i.loader.make_loader runs the
reads in torch DataLoader workers with prefetch and pinned memory.

With several caption fields (t2i.caption_fields) each sample trains on one field per epoch,
picked from (seed, epoch, sample) with the configured weights (or, with caption scores, each
sample's own weights: t2i.caption_scores): only that field's text columns are read for it.

With `teacher` (REPA, t2i.repa) each sample's stored teacher patch tokens are read with its
latents (one more binary column of the same row group, copied the same way): `Batch.teacher`.
Compact text features (text_dtype int8 | fp8) are decoded to float16 as they are copied (t2i.text_codec).

A `Holdout` (the validation loss's keys, chosen by key hash) is taken out of the buckets, so no
batch of global_batches ever holds one; `val_indices` lists them, `val_hashes` their key hashes.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shards import ShardError, UserError, complete_shards
from shards.reader import damaged
from t2i.caption_fields import DEFAULT_FIELDS, normalised, parse_fields, parse_weights, pick_fields, text_columns, uniforms
from t2i.caption_scores import CaptionScoring, field_probabilities
from t2i.feature_index import BIG_ROW_GROUP, open_index
from t2i.noise import uniforms as word_uniforms
from t2i.text_codec import copy_compact, decoded_dtype, is_compact

ROW_COLUMNS = ["key", "latent_mean", "latent_std"]  # read per sample (each column costs a read), + the text of its field
LAYOUT_COLUMNS = ["latent_shape", "text_channels", "text_dtype", "height", "width"]  # read once per bucket
TEACHER_LAYOUT = ["teacher_shape", "teacher_dtype"]  # with teacher features, also read once per bucket
OPEN_FILES = 64  # Parquet files kept open per process (footer parsed once, then reused)


@dataclass
class Batch:
    keys: list[str]
    latent_mean: torch.Tensor  # (B, C, h, w) in the stored latent dtype (float32 unless --latent-dtype)
    latent_std: torch.Tensor
    text: torch.Tensor  # (B, max_tokens, C) in the stored text dtype (compact: float16), zero-padded
    mask: torch.Tensor  # (B, max_tokens) long
    height: int  # pixel size of this bucket
    width: int
    epoch: int = 0  # data position of the global batch this is a slice of (set by make_loader)
    batch_pos: int = 0
    last_in_epoch: bool = False  # no non-empty global batch follows in this epoch
    caption_fields: list[str] = field(default_factory=list)  # the caption field each sample's text is of
    teacher: torch.Tensor | None = None  # (B, rows x columns, channels) teacher patch tokens (REPA), stored dtype
    teacher_grid: tuple[int, int] = (0, 0)  # their patch grid (rows, columns)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread: the tensors moved to page-locked memory."""
        return Batch(**{f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v) for f in fields(self)})


@dataclass(frozen=True)
class Holdout:
    """Keys held out of training for the validation loss: a share of them (`fraction`) or a number
    (`count`: the keys with the smallest hashes), chosen by key hash (t2i.noise.string_hashes),
    so the same keys on every process, rerun and resume, whatever the shards' order."""

    fraction: float = 0.0
    count: int = 0

    def __bool__(self) -> bool:
        return bool(self.fraction or self.count)

    def select(self, hashes: np.ndarray) -> np.ndarray:
        """A bool mask over the samples (their key hashes): True for a held-out key."""
        held = np.zeros(len(hashes), bool)
        if self.count:
            if self.count >= len(hashes):
                raise UserError(f"val_keys = {self.count} holds out every one of the {len(hashes)} samples: hold out fewer")
            held[np.argsort(hashes, kind="stable")[: self.count]] = True
        elif self.fraction:
            held = word_uniforms(hashes) < self.fraction
            if not held.any():
                raise UserError(f"val_fraction = {self.fraction} holds out none of the {len(hashes)} samples: raise it, or set val_keys")
        return held


class RowLayout(NamedTuple):
    """What the rows of one batch share: latent (C, h, w), text channels and dtype, pixel size."""

    latent_shape: tuple[int, ...]
    channels: int
    text_dtype: torch.dtype
    height: int
    width: int
    latent_dtype: torch.dtype = torch.float32  # features --latent-dtype; shards without the column: float32
    teacher: tuple[int, ...] = ()  # (rows, columns, channels) of the teacher patch tokens; (): not read
    teacher_dtype: torch.dtype = torch.float16
    text_codec: str = ""  # text stored compact (int8, fp8: t2i.text_codec), decoded to text_dtype (float16); "": as is

    @property
    def teacher_bytes(self) -> int:
        """Bytes of one sample's teacher patch tokens (0 when they are not read)."""
        return int(np.prod(self.teacher)) * self.teacher_dtype.itemsize if self.teacher else 0


class GroupRead(NamedTuple):
    """One row group read for a batch: which batch positions it fills, from which of its rows,
    with the text of which caption field."""

    positions: np.ndarray
    table: pa.Table
    rows: np.ndarray
    field_ids: np.ndarray
    codec: str = ""  # RowLayout.text_codec


class StreamingFeatureDataset(torch.utils.data.Dataset):
    """All complete feature shards of one directory, indexed; rows are read on demand.

    `ds[indices]` (= `get`) reads one batch: rows grouped by (shard, row group), so a batch
    costs one read per distinct row group it touches. t2i.loader.make_loader runs the reads in
    DataLoader workers."""

    def __init__(self, features_dir: str | Path, max_tokens: int, caption_fields=DEFAULT_FIELDS, caption_weights=(),
                 holdout: Holdout = Holdout(), teacher: bool = False,
                 scoring: CaptionScoring | None = None) -> None:
        self.features_dir = features_dir
        self.shards = [str(s) for s in complete_shards(features_dir)]
        if not self.shards:
            raise ShardError(f"no complete feature shards in {features_dir}: run `t2i-data features` first")
        self.max_tokens = max_tokens
        self.teacher = teacher  # read the teacher patch tokens too (REPA)
        if teacher and "teacher_emb" not in pq.read_schema(self.shards[0]).names:
            raise UserError(f"the features in {features_dir} hold no teacher patch tokens: make them with a teacher "
                            "(`t2i-data features --teacher ...`, or train with --shards and teacher set)")
        self.caption_fields = parse_fields(caption_fields)
        self.text_columns = [text_columns(f) for f in self.caption_fields]
        self.weights = normalised(parse_weights(caption_weights, self.caption_fields), len(self.caption_fields))
        self._open_index()
        # per sample and field (float16), when the draw is weighted by caption scores
        self.field_probs = None
        if scoring is not None and self.has is not None:
            self.field_probs = field_probabilities(scoring, self.caption_fields, self.key_hash, self.has, self.weights)
        held = holdout.select(self.key_hash)
        self.val_indices = np.flatnonzero(held)  # the held-out samples, in key order
        self.val_hashes = self.key_hash[self.val_indices]  # their key hashes (the rest are not kept)
        del self.key_hash
        if len(self.val_indices):
            self.buckets = {b: m[~held[m]] for b, m in self.buckets.items()}
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._layouts: dict[int, RowLayout] = {}
        self._pid = os.getpid()

    def _open_index(self) -> None:
        """The index from the directory's cache (t2i.feature_index) when it matches the shards,
        else built from the shards (and cached once the directory is complete)."""
        arrays = open_index(self.features_dir, self.shards, self.caption_fields)
        _warn_big_groups([self.shards[s] for s in arrays["big_groups"]])
        self.shard, self.group, self.row, self.bucket_of = arrays["shard"], arrays["group"], arrays["row"], arrays["bucket_of"]
        self.key_hash = arrays["key_hash"]
        members = np.split(arrays["members"], np.cumsum(arrays["bucket_sizes"])[:-1])
        self.buckets: dict[tuple[int, int], np.ndarray] = {(int(h), int(w)): m for (h, w), m in zip(arrays["sizes"], members)}
        # a bit per caption field the sample has (None: one field, which every sample has)
        self.has = arrays["has"] if len(self.caption_fields) > 1 else None

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

    def pick_fields(self, indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """The caption field (an index into caption_fields) each sample trains on in `epoch`:
        drawn with the caption weights among the fields it has, from (seed, epoch, sample) alone
        (the sample: its position in key order), so every rank, rerun and resume draws the same."""
        indices = np.asarray(indices)
        if self.has is None:
            return np.zeros(len(indices), np.uint8)
        weights = self.weights if self.field_probs is None else self.field_probs[indices]
        return pick_fields(uniforms(seed, epoch, indices), weights, self.has[indices])

    def first_fields(self, indices: np.ndarray) -> np.ndarray:
        """The first of caption_fields each sample has (what `get` reads)."""
        if self.has is None:
            return np.zeros(len(indices), np.uint8)
        has = self.has[np.asarray(indices)]
        return np.argmax((has[:, None] >> np.arange(len(self.caption_fields), dtype=np.uint8)) & 1, axis=1).astype(np.uint8)

    def __getitem__(self, indices: np.ndarray) -> Batch:
        return self.get(indices)

    def get(self, indices: np.ndarray, field_ids: np.ndarray | None = None) -> Batch:
        """The samples `indices` (positions in key order, all of one bucket) as one Batch, each
        with the text of its caption field `field_ids` (default: its first field)."""
        reads, layout = self.read(indices, field_ids)
        return self.get_from(reads, layout, len(indices))

    def get_from(self, reads, layout: RowLayout, n: int) -> Batch:
        """A Batch of fresh tensors (in shared memory inside a loader worker) from `read`'s output."""
        means = _empty((n, *layout.latent_shape), layout.latent_dtype)
        stds = _empty((n, *layout.latent_shape), layout.latent_dtype)
        text = _empty((n, self.max_tokens, layout.channels), layout.text_dtype)
        rows, cols, channels = layout.teacher or (0, 0, 0)
        teacher = _empty((n, rows * cols, channels), layout.teacher_dtype) if layout.teacher else None
        raw_teacher = None if teacher is None else _raw(teacher.view(n, -1))
        keys, lens, names = self.fill(reads, _raw(text), _raw(means), _raw(stds), raw_teacher)
        return Batch(keys=keys, latent_mean=means, latent_std=stds, text=text, mask=mask_of(lens, self.max_tokens),
                     height=layout.height, width=layout.width, caption_fields=names, teacher=teacher, teacher_grid=(rows, cols))

    def read(self, indices: np.ndarray, field_ids: np.ndarray | None = None) -> tuple[list[GroupRead], RowLayout]:
        """The row groups holding `indices` (one read per distinct shard and row group, of the
        text columns of the caption fields `field_ids` only; default: each sample's first), and
        the batch's layout (from its first row: one bucket shares it)."""
        indices = np.asarray(indices)
        if not len(indices):
            raise ValueError("an empty batch has no bucket")
        field_ids = self.first_fields(indices) if field_ids is None else np.asarray(field_ids, np.uint8)
        layout = self._layout(int(indices[0]))
        return self._read_groups(indices, field_ids, layout.text_codec), layout

    def _layout(self, i: int) -> RowLayout:
        """The layout of sample i's bucket, read from sample i once per bucket and process."""
        b = int(self.bucket_of[i])
        if b not in self._layouts:
            f = self._file(int(self.shard[i]))
            extra = ["latent_dtype"] if "latent_dtype" in f.schema_arrow.names else []
            t = self._read_group(int(self.shard[i]), int(self.group[i]),
                                 LAYOUT_COLUMNS + extra + (TEACHER_LAYOUT if self.teacher else []))
            r = int(self.row[i])
            row = {name: t.column(name)[r].as_py() for name in t.column_names}
            teacher = {}
            if self.teacher:
                teacher = {"teacher": tuple(row["teacher_shape"]), "teacher_dtype": getattr(torch, row["teacher_dtype"])}
            codec = row["text_dtype"] if is_compact(row["text_dtype"]) else ""
            self._layouts[b] = RowLayout(tuple(row["latent_shape"]), row["text_channels"], decoded_dtype(row["text_dtype"]),
                                         row["height"], row["width"], getattr(torch, row.get("latent_dtype") or "float32"),
                                         **teacher, text_codec=codec)
        return self._layouts[b]

    def fill(self, reads: list[GroupRead], text: np.ndarray, means: np.ndarray, stds: np.ndarray,
             teacher: np.ndarray | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """Copy the rows of `reads` straight from their Arrow buffers into raw byte views of the
        batch tensors: text (n, max_tokens, row bytes), zero-padded; means, stds and, when read,
        the teacher patch tokens (n, bytes). Returns the keys, the kept token counts and each
        sample's caption field."""
        n = len(text)
        lens = np.zeros(n, np.int64)
        keys: list[str] = [""] * n
        names: list[str] = [""] * n
        for positions, table, rows, field_ids, codec in reads:
            _copy_rows(table.column("latent_mean"), rows, means, positions)
            _copy_rows(table.column("latent_std"), rows, stds, positions)
            if teacher is not None:
                _copy_rows(table.column("teacher_emb"), rows, teacher, positions)
            for f in np.unique(field_ids):
                at, cols = field_ids == f, self.text_columns[f]
                lens[positions[at]] = np.minimum(table.column(cols.len).fill_null(0).to_numpy()[rows[at]], self.max_tokens)
                if codec:  # decoded on the fly (t2i.text_codec)
                    copy_compact(_binary_views(table.column(cols.emb)), _binary_views(table.column(cols.scale)), rows[at],
                                 lens[positions[at]], text, positions[at], codec)
                else:
                    _copy_text(table.column(cols.emb), rows[at], lens[positions[at]], text, positions[at])
            for p, k, f in zip(positions, table.column("key").take(pa.array(rows)).to_pylist(), field_ids):
                keys[p], names[p] = k, self.caption_fields[f]
        return keys, lens, names

    def _read_groups(self, indices: np.ndarray, field_ids: np.ndarray, codec: str = "") -> list[GroupRead]:
        """A GroupRead for each distinct (shard, row group) of `indices` (with `codec`, the text scales too)."""
        shard, group, row = self.shard[indices], self.group[indices], self.row[indices]
        unit = shard.astype(np.int64) << 32 | group
        reads = []
        for u in np.unique(unit):
            positions = np.flatnonzero(unit == u)
            texts = [c for f in np.unique(field_ids[positions]) for c in self.text_columns[f][1 : 4 if codec else 3]]
            columns = ROW_COLUMNS + (["teacher_emb"] if self.teacher else []) + texts
            table = self._read_group(int(u >> 32), int(u & 0xFFFFFFFF), columns)
            reads.append(GroupRead(positions, table.combine_chunks(), row[positions], field_ids[positions], codec))
        return reads

    def _read_group(self, s: int, group: int, columns: list[str]) -> pa.Table:
        """Row group `group` of shard `s` (page checksums verified: a damaged shard is one line)."""
        try:
            return self._file(s).read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise damaged(self.shards[s], e) from None

    def _file(self, s: int) -> pq.ParquetFile:
        """Shard `s`, opened lazily per process (a forked loader worker opens its own)."""
        if self._pid != os.getpid():
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
        else:
            self._files[s] = pq.ParquetFile(self.shards[s], memory_map=True, page_checksum_verification=True)
            if len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)
        return self._files[s]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": OrderedDict()}  # open files stay with their process


def _warn_big_groups(paths: list[str]) -> None:
    for path in paths:
        warnings.warn(f"{path} has row groups over {BIG_ROW_GROUP >> 20} MiB: every sample read decodes its whole group; "
                      "rewrite the features with this version (row groups of ~1 MiB) for fast training", stacklevel=4)


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


def _copy_text(column: pa.ChunkedArray, rows: np.ndarray, lens: np.ndarray, out: np.ndarray, positions: np.ndarray) -> None:
    """The first lens[i] token rows of each text embedding into out[positions[i]] (zero-padded)."""
    offsets, data = _binary_views(column)
    row_bytes = out.shape[-1]
    for p, r, n in zip(positions, rows, lens):
        start = offsets[r]
        out[p, :n] = data[start : start + n * row_bytes].reshape(n, row_bytes)
        out[p, n:] = 0


def _raw(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a contiguous tensor: (n, max_tokens, row bytes) for
    3-d text, (n, bytes) otherwise."""
    raw = t.view(len(t), -1).view(torch.uint8).numpy()
    return raw.reshape(t.shape[0], t.shape[1], -1) if t.dim() == 3 else raw


def mask_of(lens: np.ndarray, max_tokens: int) -> torch.Tensor:
    """(n, max_tokens) long: 1 on the first lens[i] tokens."""
    return (torch.arange(max_tokens) < torch.from_numpy(np.asarray(lens, np.int64))[:, None]).long()


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, allocated in shared memory right away, so
    handing it to the training process costs no copy (what default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)
