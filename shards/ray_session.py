"""One way to run a job on Ray, for every engine (caption, stats, score)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from shards.errors import UserError


def import_ray():
    """`ray` with `ray.data`, or the one-line UserError that says how to install them. Every
    engine calls this before any work, so a missing Ray is said once, the same way."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(f'--engine ray needs Ray Data, which is not installed ({e}): pip install "t2i-data[ray]"') from None
    return ray


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator:
    """Ray for the duration of a job: connect to `address`, or start a local Ray with `num_cpus`
    (default: all cores) and no dashboard, and shut it down afterwards. A Ray the caller has
    already initialised is used as it is and left running. Ray Data keeps rows in input order
    (the local engines' order) and shows no progress bars of its own (ours are on screen)."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus or os.cpu_count() or 1}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        except ConnectionError as e:
            raise UserError(f"cannot connect to Ray at --ray-address {address} ({e}): start the cluster (ray start --head) or pass its address") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_resources(cluster: dict, replicas: int) -> dict:
    """Resources of one model actor: one GPU on a GPU cluster. On CPUs, at most one CPU each and
    always half a CPU left for the read tasks: actors holding every CPU would starve them and
    hang the job."""
    if cluster.get("GPU", 0) > 0:
        return {"num_gpus": 1}
    cpus = cluster.get("CPU", 1)
    return {"num_cpus": max(0.01, min(1.0, (cpus - 0.5) / replicas))}


_fetched: dict[str, object] = {}  # per Ray worker process: the last shared value fetched


def fetch_once(value):
    """`value`, or for a Ray ObjectRef the object it names, fetched once per worker process (a
    set of done keys passed to every task of a resumed run may hold millions)."""
    import ray

    if not isinstance(value, ray.ObjectRef):
        return value
    ref = value.hex()
    if ref not in _fetched:
        _fetched.clear()
        _fetched[ref] = ray.get(value)
    return _fetched[ref]
