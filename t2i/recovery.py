"""Runs that recover themselves: verified resume, a tolerant log, one writer per run directory.

    @guard_run_dir              # on train(): lock the run directory, refuse a fresh run into an old one
    ck = resumable_checkpoint(out)   # the newest checkpoint that verifies; damaged newer ones set aside
    truncate_log(out / "log.jsonl", step)   # drops lines past the checkpoint and a half-written last line

A checkpoint verifies when every safetensors file's header is whole and the file is as long as
the header says (a truncated file fails without reading gigabytes), the small files load fully
(rng tensors, trainer_state.json, transformer/config.json), its step matches its name, and every
file has the SHA-256 recorded when it was written (checksums.json: a flipped byte in a file of
the right size). Sample, export and eval load through `usable_checkpoint`, the same checks on
the files they read.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import struct
import sys
from pathlib import Path
from typing import Callable

from shards.errors import UserError
from shards.fs import write_text
from t2i.checkpoint import (CHECKSUMS, DAMAGED_PREFIX, LATEST, TRAINER_STATE, checkpoint_dirs, latest_checkpoint, parse_step,
                            require_checkpoint)

SAFETENSORS = ("model", "ema", "optimizer", "rng")


class DamagedCheckpoint(Exception):
    """Why a checkpoint cannot be resumed from (one line)."""


def check_safetensors(path: Path) -> None:
    """Raise DamagedCheckpoint unless `path` has a whole header and all the bytes it promises."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path.name} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedCheckpoint(f"{path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DamagedCheckpoint(f"{path.name} is truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise DamagedCheckpoint(f"{path.name} has a damaged header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise DamagedCheckpoint(f"{path.name} is {size} bytes, its header describes {8 + n + end}: truncated or damaged")


def check_checksums(ck: Path, names: tuple[str, ...] | None = None) -> None:
    """Raise DamagedCheckpoint when a file of `ck` (those in `names`, default all) differs from
    the SHA-256 recorded when it was written (checksums.json; checkpoints from before it: not
    checked), e.g. a flipped byte in a file whose size is right."""
    from shards.fs import sha256

    path = ck / CHECKSUMS
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text())
    except ValueError:
        raise DamagedCheckpoint(f"{CHECKSUMS} is damaged") from None
    for name, digest in sums.items():
        if names is not None and name not in names:
            continue
        if not (ck / name).is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if sha256(ck / name) != digest:
            raise DamagedCheckpoint(f"{name} does not match the checksum recorded when it was written (a changed byte)")


def verify_checkpoint(ck: Path, weights: tuple[str, ...] = SAFETENSORS) -> dict:
    """The checkpoint's trainer state, after checking its files (of the safetensors, those in
    `weights`: all for a resume, the ones a sampler loads otherwise) and their checksums;
    DamagedCheckpoint otherwise."""
    from safetensors.torch import load_file

    for name in weights:
        check_safetensors(ck / f"{name}.safetensors")
    try:
        if "rng" in weights:
            load_file(str(ck / "rng.safetensors"))  # small: loaded whole
        json.loads((ck / "transformer" / "config.json").read_text())
        state = json.loads((ck / TRAINER_STATE).read_text())
    except FileNotFoundError as e:
        raise DamagedCheckpoint(f"{Path(e.filename).name} is missing") from None
    except Exception as e:  # noqa: BLE001 - any parse/load failure means: do not resume from it
        raise DamagedCheckpoint(f"a file does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"{TRAINER_STATE} has no step")
    if parse_step(ck.name) is not None and state["step"] != parse_step(ck.name):
        raise DamagedCheckpoint(f"{TRAINER_STATE} says step {state['step']}, the directory says {parse_step(ck.name)}")
    every = weights == SAFETENSORS
    check_checksums(ck, None if every else (*(f"{w}.safetensors" for w in weights), TRAINER_STATE, "transformer/config.json"))
    return state


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resumable_checkpoint(run_dir: str | Path, set_aside: bool = True, weights: tuple[str, ...] = SAFETENSORS,
                         doing: str = "resuming from") -> Path | None:
    """The newest checkpoint of `run_dir` that verifies (`latest` first, then by step number;
    `weights`: the safetensors checked, all for a resume). Each damaged newer one is named in
    one warning and, with `set_aside`, renamed `damaged-step-*` so no later scan picks it again
    (rotation counts those toward keep_checkpoints). None when the run has no checkpoint;
    UserError when it has some but none verifies."""
    run_dir = Path(run_dir)
    first = latest_checkpoint(run_dir)
    candidates = ([first] if first is not None else []) + [c for c in checkpoint_dirs(run_dir) if c != first]
    damaged = []
    for ck in candidates:
        try:
            verify_checkpoint(ck, weights)
        except DamagedCheckpoint as e:
            damaged.append(f"{ck.name} ({e})")
            if set_aside:
                os.replace(ck, ck.with_name(DAMAGED_PREFIX + ck.name))
            continue
        if damaged:
            warn(f"{doing} {ck.name} instead: damaged checkpoint(s) {'; '.join(damaged)}"
                 + (f", renamed {DAMAGED_PREFIX}*" if set_aside else ""))
            if set_aside:
                write_text(ck.parent / LATEST, ck.name)
        return ck
    if damaged:
        what = "resumed" if set_aside else "used"
        raise UserError(f"no checkpoint in {run_dir} can be {what}: {'; '.join(damaged)}: start again with a fresh --out")
    return None


_verified: set[tuple[str, float, tuple[str, ...]]] = set()  # (checkpoint, its mtime, weights) verified in this process


def usable_checkpoint(path: str | Path, which: str = "ema") -> Path:
    """The checkpoint sample, export and eval load: `path` itself when it is a checkpoint
    directory (UserError when it does not verify), or a run directory's newest checkpoint whose
    `which` weights verify (damaged newer ones named in one warning, left in place)."""
    path = Path(path)
    weights = (which,)
    ck = require_checkpoint(path)
    key = (str(ck.resolve()), ck.stat().st_mtime, weights)
    if key in _verified:
        return ck
    if ck == path:
        try:
            verify_checkpoint(ck, weights)
        except DamagedCheckpoint as e:
            raise UserError(f"checkpoint {ck} is damaged ({e}): pass another checkpoint of the run, or the run "
                            "directory (its newest good checkpoint is used)") from None
    else:
        ck = resumable_checkpoint(path, set_aside=False, weights=weights, doing="using")
    _verified.add((str(ck.resolve()), ck.stat().st_mtime, weights))
    return ck


def checkpoint_step(ck: Path | None) -> int | None:
    """The step a checkpoint reached, or None when there is none or it does not verify."""
    if ck is None:
        return None
    try:
        return int(verify_checkpoint(ck)["step"])
    except DamagedCheckpoint:
        return None


def has_checkpoints(run_dir: str | Path) -> bool:
    return bool(checkpoint_dirs(run_dir))


# ---- the log ---------------------------------------------------------------------------------

def append_jsonl(path: Path, rec: dict) -> None:
    """One whole line per call, in one O_APPEND write: a crash leaves at most a partial last line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())
    finally:
        os.close(fd)


def truncate_log(path: Path, step: int) -> None:
    """On resume, keep the log lines up to the checkpoint's `step` (later ones are redone) and drop
    a half-written line a crash left; rewritten atomically."""
    if not path.exists():
        return
    keep, broken = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            broken += 1  # the line a kill cut short
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line)
    if broken:
        warn(f"dropped {broken} half-written line(s) of {path}")
    write_text(path, "".join(l + "\n" for l in keep))


# ---- one writer per run directory ------------------------------------------------------------

def refuse_fresh_run_into_old(run_dir: Path, resume: bool) -> None:
    """A run without --resume into a directory that holds checkpoints would mix two runs."""
    found = checkpoint_dirs(run_dir)
    if found and not resume:
        raise UserError(f"{run_dir} already holds checkpoints of an earlier run (newest {found[0].name}): "
                        f"pass --resume to continue it, or a fresh --out to start a new run")


def guard_run_dir(train_fn: Callable) -> Callable:
    """Decorate train(cfg, out, ..., resume=...): the main process holds `out`'s lock for the whole
    run (shards.lock), and a fresh run into a directory with checkpoints is refused."""
    from shards.lock import output_lock

    sig = inspect.signature(train_fn)

    @functools.wraps(train_fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        out, resume = Path(bound.arguments["out"]), bool(bound.arguments["resume"])
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: rank 0 holds the lock for all
            refuse_fresh_run_into_old(out, resume)  # every rank stops alike (none waits on a rank that quit)
            return train_fn(*args, **kwargs)
        with output_lock(out, "train"):
            refuse_fresh_run_into_old(out, resume)
            return train_fn(*args, **kwargs)

    return wrapper
