"""One way to run a job on Ray, for every engine (caption, stats, score)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from shards.errors import UserError


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator:
    """Ray for the duration of a job: connect to `address`, or start a local Ray with `num_cpus`
    (default: all cores) and no dashboard, and shut it down afterwards. A Ray the caller has
    already initialised is used as it is and left running. Ray Data keeps rows in input order
    (the local engines' order) and shows no progress bars of its own (ours are on screen)."""
    import ray
    import ray.data

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
