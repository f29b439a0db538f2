"""Write one benchmark's section into BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure here is written by a script in `benchmarks/`, which runs our way and the naive or\n"
    "reference way in the same process and reports the ratio. Rerun a script to refresh its section.\n"
)


def machine() -> str:
    """A one-line description of where the benchmark ran."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def load_note(load_at_start: float, load_at_end: float | None = None) -> str:
    """A sentence on how busy the machine was: the 1-minute load average at the start (taken by
    the caller with os.getloadavg()) and at the end (default: now), against the core count."""
    now, cores = (os.getloadavg()[0] if load_at_end is None else load_at_end), os.cpu_count() or 1
    busy = ("above the core count: other jobs took cores from this run, so its absolute times are slow and noisy"
            if max(load_at_start, now) > cores else "at most the core count")
    return (f"Load average (1 min) {load_at_start:.1f} at the start, {now:.1f} at the end, on {cores} cores ({busy}). "
            "The machine is shared (another agent trains models on the same cores): trust the ratios of ways measured "
            "in the same run over the absolute figures.")


def write_section(name: str, body: str, where: str | None = None) -> Path:
    """Replace (or append) the section delimited by markers for `name` in BENCHMARKS.md.
    `where`: the machine the figures come from, when it is not this one (a GPU run's JSON)."""
    stamp = datetime.date.today().isoformat()
    block = f"<!-- {name}:start -->\n## {name}\n\n_Run {stamp} on {where or machine()}._\n\n{body.strip()}\n<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)
    return BENCHMARKS_MD
