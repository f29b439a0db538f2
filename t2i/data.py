"""Feature-shard dataset: bucketed batches (one bucket per batch), a deterministic epoch order
and a data position (epoch, batch) that a resumed run continues from exactly, on any number of
processes with the same global batch (each rank reads only its slice of a global batch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shards import ShardError, complete_shards


@dataclass
class Batch:
    keys: list[str]
    latent_mean: torch.Tensor  # (B, C, h, w)
    latent_std: torch.Tensor
    text: torch.Tensor  # (B, max_tokens, C) float32, zero-padded
    mask: torch.Tensor  # (B, max_tokens) long
    height: int  # pixel size of this bucket
    width: int


class FeatureDataset:
    """All complete feature shards of one directory, memory-mapped."""

    def __init__(self, features_dir: str | Path, max_tokens: int) -> None:
        shards = complete_shards(features_dir)
        if not shards:
            raise ShardError(f"no complete feature shards in {features_dir}: run `t2i-data features` first")
        self.table = pa.concat_tables([pq.read_table(s, memory_map=True) for s in shards])
        # a stable order independent of shard write order: sort by key
        order = np.argsort(np.asarray(self.table.column("key").to_pylist(), dtype=object), kind="stable")
        self.table = self.table.take(pa.array(order))
        self.max_tokens = max_tokens
        hw = np.stack([self.table.column("height").to_numpy(), self.table.column("width").to_numpy()], 1)
        self.buckets: dict[tuple[int, int], np.ndarray] = {}
        for b in sorted({tuple(x) for x in hw.tolist()}):
            self.buckets[b] = np.flatnonzero((hw[:, 0] == b[0]) & (hw[:, 1] == b[1]))

    def __len__(self) -> int:
        return self.table.num_rows

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

    def get(self, indices: np.ndarray) -> Batch:
        t = self.table.take(pa.array(indices))
        shape = t.column("latent_shape")[0].as_py()
        means = np.stack([np.frombuffer(b, np.float32).reshape(shape) for b in t.column("latent_mean").to_pylist()])
        stds = np.stack([np.frombuffer(b, np.float32).reshape(shape) for b in t.column("latent_std").to_pylist()])
        ch = t.column("text_channels")[0].as_py()
        text = torch.zeros(len(indices), self.max_tokens, ch)
        mask = torch.zeros(len(indices), self.max_tokens, dtype=torch.long)
        for i, (buf, n, dt) in enumerate(zip(t.column("text_emb").to_pylist(), t.column("text_len").to_pylist(), t.column("text_dtype").to_pylist())):
            n = min(n, self.max_tokens)
            arr = torch.frombuffer(bytearray(buf), dtype=getattr(torch, dt)).view(-1, ch)[:n]
            text[i, :n] = arr.float()
            mask[i, :n] = 1
        return Batch(
            keys=t.column("key").to_pylist(),
            latent_mean=torch.from_numpy(means.copy()),
            latent_std=torch.from_numpy(stds.copy()),
            text=text,
            mask=mask,
            height=t.column("height")[0].as_py(),
            width=t.column("width")[0].as_py(),
        )
