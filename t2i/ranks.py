"""The processes of a data-parallel features run (torchrun / accelerate launch): which rank this
is, its share of the caption shards' row groups, barriers and summed counts."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from shards.reader import Shard


@dataclass
class Ranks:
    """This process's share of a data-parallel features run (rank 0 of 1 by default)."""

    rank: int = 0
    world_size: int = 1

    def share(self, shards: list[Shard]) -> list[tuple[Shard, list[int]]]:
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
        """Wait for every rank (no-op alone)."""
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
    """This rank's GPU (LOCAL_RANK's, modulo the GPUs), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', ranks.rank)) % torch.cuda.device_count()}"
    return "cpu"


def set_threads(threads: int) -> None:
    """torch's CPU threads in this process (0: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)
