"""One bounded, in-order prefetch: the jobs' worker threads (decode, prepare, read) run ahead of
the consumer by at most `depth` items, so memory stays flat at any dataset size."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int, name: str = "prefetch") -> Iterator[R]:
    """fn(item) for every item, in input order, computed by `workers` threads at most `depth`
    items ahead of the consumer. (PIL decoding and resizing release the GIL, so threads scale.)
    Closing the generator early stops submitting and waits only for the items in flight."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name) as pool:
        inflight: deque = deque()
        for item in items:
            inflight.append(pool.submit(fn, item))
            if len(inflight) >= max(1, depth):
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
