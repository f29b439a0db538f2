"""The checks every command makes before any work, each failure one UserError line naming the
flag and its fix: numbers in their range (`Range`, declared by each job's config class), text
inputs that exist and read as UTF-8 (`read_text_input`), and outputs that can be written
(`check_output_dir`, `check_output_file`: created and probed before hours of work, not after).

    RANGES = {"steps": Range(1, 10_000), "guidance": Range(0, 100), "seed": SEED}
    check_ranges(cfg, RANGES)            # error: --steps 0 is out of range: pass a whole number from 1 to 10000
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shards import fs
from shards.errors import UserError, resource_error


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: [lo, hi], either end open or absent (None)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    flag: str | None = None  # how the message names it (default: --name with dashes)

    def holds(self, value: float) -> bool:
        """Whether `value` is a finite number inside the range."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return low and high

    def describe(self, whole: bool) -> str:
        """The range in words: "a whole number from 1 to 4096", "a number above 0", "a number in (0, 1]"."""
        kind = "a whole number" if whole else "a number"
        lo, hi = _show(self.lo), _show(self.hi)
        if self.lo is not None and self.hi is not None:
            if whole or not (self.lo_open or self.hi_open):
                return f"{kind} from {lo} to {hi}"
            return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'above' if self.lo_open else 'of at least'} {lo}"
        return f"{kind} {'below' if self.hi_open else 'of at most'} {hi}"

    def check(self, name: str, value: Any, dashes: bool = True) -> None:
        """UserError when `value` (the setting `name`) is a number outside the range; None and
        booleans pass (an optional setting left out, a switch)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if not self.holds(value):
            flag = self.flag or ("--" + name.replace("_", "-") if dashes else name)
            raise UserError(f"{flag} {value} is out of range: pass {self.describe(isinstance(value, int))}")


SEED = Range(0, 2**32 - 1)  # numpy and torch generators take seeds in [0, 2**32)
COUNT = Range(1)  # a batch size, a shard size, a number of replicas: at least one
WORKERS = Range(0, 1024)  # threads or processes (0: the command's default)
FRACTION = Range(0, 1)


def check_ranges(config: Any, ranges: Mapping[str, Range], dashes: bool = True) -> None:
    """Check every setting named in `ranges` on `config` (an object with those attributes)."""
    for name, rule in ranges.items():
        rule.check(name, getattr(config, name), dashes)


def _show(x: float | None) -> str:
    if x is None:
        return ""
    return f"{int(x):,}".replace(",", "") if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# ---- text inputs -----------------------------------------------------------------------------


def read_text_input(path: str | Path, flag: str, fix: str) -> str:
    """The text of a user's input file (a local path or a URI), as UTF-8; one-line UserError when
    it is missing, a directory, binary or not UTF-8 (naming the line), `fix` saying what to pass."""
    loc = fs.as_location(path)
    if not fs.exists(loc):
        raise UserError(f"{flag} {path} not found: {fix}")
    if fs.is_dir(loc):
        raise UserError(f"{flag} {path} is a directory, not a text file: {fix}")
    try:
        data = fs.read_bytes(loc)
    except OSError as e:
        raise resource_error(e, path, "read") or UserError(f"cannot read {flag} {path} ({e.strerror or e}): {fix}") from None
    return decode_text(data, f"{flag} {path}", fix)


def decode_text(data: bytes, what: str, fix: str) -> str:
    """`data` as UTF-8 text; a UserError naming the first bad line for binary or other encodings."""
    if b"\x00" in data[:65536]:
        raise UserError(f"{what} is a binary file, not text: {fix}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{what} is not UTF-8 text (line {line}): save it as UTF-8, or {fix}") from None


# ---- outputs ---------------------------------------------------------------------------------


def check_output_dir(path: str | Path, flag: str = "--out", empty: bool = False, shown: str | Path | None = None) -> None:
    """Create the output directory `path` (with its parents) and prove it writable with a probe
    file, before any work; `empty`: it must hold nothing yet. One-line UserError otherwise,
    naming `shown` (default `path`: what the user passed)."""
    shown = path if shown is None else shown
    loc = fs.as_location(path)
    if not isinstance(loc, Path):
        fs.makedirs(loc)  # object stores: the bucket reachable with the credentials at hand
        return
    if loc.exists() and not loc.is_dir():
        if shown == path:
            raise UserError(f"{flag} {path} is a file, not a directory: pass a directory")
        raise _output_error(NotADirectoryError(20, "Not a directory"), shown, flag)
    try:
        fs.makedirs(loc)
        probe = loc / f".t2i-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise _output_error(e, shown, flag) from None
    if empty and any(loc.iterdir()):
        raise UserError(f"{flag} {shown} exists and is not empty: pass a new directory")


def check_output_file(path: str | Path, flag: str = "--out") -> None:
    """The output file `path` can be written: not a directory, its folder created and writable."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path} is a directory: pass a file name")
    check_output_dir(p.parent if str(p.parent) else Path("."), flag, shown=path)


def _output_error(e: OSError, where: str | Path, flag: str) -> UserError:
    """An OSError of creating or probing an output, as one line."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) or e.errno == 20:
        return UserError(f"cannot create {flag} {where}: a part of the path is a file, not a directory: "
                         "pass a path whose parents are directories")
    found = resource_error(e, f"{flag} {where}")
    return found or UserError(f"cannot write {flag} {where} ({e.strerror or e}): pass a writable directory")

