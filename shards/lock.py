"""One writer per output directory: `with output_lock(out, "caption"): ...`.

Two runs writing one directory duplicate rows and delete each other's temporary files, so every
job that writes (caption, features, train) takes this lock before it cleans anything up.

Local directories: an exclusive `fcntl.flock` on `<out>/.t2i-lock`. The kernel drops it when
the process dies, even by `kill -9`, so a crash never leaves it held. The file also records the
holder (host, pid, start time, command) for the refusal message; it is rewritten in place, never
replaced, because the lock belongs to the inode.

Object stores (s3://, gs://, fsspec URIs; see shards.fs) have no locks, so there the lock is a
lease object `<out>/.t2i-lease.json` (holder + heartbeat + expiry) that a thread renews. A lease
whose heartbeat stopped (its run crashed) expires after `LEASE_TTL_S` and may then be taken
over. Object stores offer no compare-and-swap through pyarrow, so two runs starting within the
same second could both write a lease; after writing, a run reads the lease back and only the
one whose lease survived goes on.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shards import fs
from shards.errors import UserError, resource_error

LOCK_FILE = ".t2i-lock"
LEASE_FILE = ".t2i-lease.json"
LEASE_TTL_S = 60.0


class OutputLocked(UserError):
    """Another live run holds the output directory."""


def holder_info(job: str) -> dict:
    """Who is writing: shown to a second run that is refused."""
    return {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else job, "id": uuid.uuid4().hex}


def describe(holder: dict) -> str:
    return (f"{holder.get('job', '?')} run on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}: `{holder.get('command', '?')}`")


def ensure_output_dir(out: str | Path) -> None:
    """Create `out` (and parents), or raise a one-line UserError saying why it cannot be."""
    loc = fs.as_location(out)
    if isinstance(loc, Path) and loc.exists() and not loc.is_dir():
        raise UserError(f"--out {loc} is a file: pass a directory")
    try:
        fs.makedirs(loc)
    except OSError as e:
        err = resource_error(e, loc, "create the output directory")
        if err is None:
            raise
        raise err from None


@contextmanager
def output_lock(out: str | Path, job: str) -> Iterator[dict]:
    """Hold `out` for this run (created if missing); OutputLocked (one line, naming the holder)
    when another live run holds it. Yields this run's holder record."""
    loc = fs.as_location(out)
    ensure_output_dir(loc)
    me = holder_info(job)
    if isinstance(loc, Path):
        with _flock(loc, me):
            yield me
    else:
        with _lease(loc, me, LEASE_TTL_S):
            yield me


# lock descriptors this process holds. A forked child (a DataLoader worker, a decode process)
# inherits them, and an flock lives until the last copy is closed: a worker that outlives its
# killed parent by a few seconds would keep the output locked. So children close their copies.
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextmanager
def _flock(directory: Path, me: dict) -> Iterator[None]:
    import fcntl

    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        err = resource_error(e, directory, "write to")
        if err is None:
            raise
        raise err from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{directory} is in use by another {_read_holder(fd)}: wait for it to finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _HELD_FDS.add(fd)
        yield
    finally:
        _HELD_FDS.discard(fd)
        os.close(fd)  # closing releases the lock; the file stays (deleting it would race a newcomer)


def _read_holder(fd: int) -> str:
    try:
        return describe(json.loads(os.pread(fd, 1 << 16, 0) or b"{}"))
    except ValueError:  # the holder is between truncate and write
        return "run (holder not yet recorded)"


@contextmanager
def _lease(directory: str, me: dict, ttl: float) -> Iterator[None]:
    path = fs.join(directory, LEASE_FILE)
    current = _read_lease(path)
    if current and current.get("expires", 0) > time.time() and current.get("id") != me["id"]:
        raise OutputLocked(f"{directory} is leased by another {describe(current)} (heartbeat {time.time() - current.get('heartbeat', 0):.0f} s ago): "
                           f"wait for it to finish (or {ttl:.0f} s after it died), or pass another --out")
    _write_lease(path, me, ttl)
    time.sleep(min(1.0, ttl / 10))  # let a simultaneous starter's write land, then see who won
    won = _read_lease(path)
    if not won or won.get("id") != me["id"]:
        raise OutputLocked(f"{directory} was just leased by another {describe(won or {})}: wait for it to finish, or pass another --out")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl / 3):
            try:
                _write_lease(path, me, ttl)
            except Exception:  # noqa: BLE001 - a network hiccup: the next beat tries again, well before expiry
                pass

    thread = threading.Thread(target=beat, name="t2i-lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read_lease(path) or {}).get("id") == me["id"]:
            fs.delete(path)


def _read_lease(path: str) -> dict | None:
    try:
        return json.loads(fs.read_text(path)) if fs.exists(path) else None
    except (ValueError, FileNotFoundError):
        return None


def _write_lease(path: str, me: dict, ttl: float) -> None:
    now = time.time()
    fs.write_text(path, json.dumps({**me, "heartbeat": now, "expires": now + ttl}))
