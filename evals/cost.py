"""Quality against cost: each checkpoint's scores joined with what its run had cost up to that step,
from the run's ledger (`<run dir>/ledger.jsonl`, shards.ledger: one record per job run and rank).

The train records of a rank are in the order they ran, each with the steps it took (`steps`), so
record k covered steps (sum of the earlier ones, that plus its own]. The cost up to step S sums,
over every rank's train records, the share of the record's device-hours, kWh and kg CO2e that fell
at or before S (linearly within a record); a record without steps (an interrupted run) counts whole
once S reaches its start. Other jobs in the same ledger (features, ...) are a fixed cost
(`other`), reported beside and not added. `figure`: each score against GPU-hours, one PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shards.ledger import LEDGER

FIELDS = ("device_hours", "energy_kwh", "kg_co2e")


def find_ledger(path: str | Path) -> Path | None:
    """The ledger of the run a checkpoint (or run directory) belongs to, if any."""
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / LEDGER).is_file():
            return d / LEDGER
    return None


def read_ledger(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cost_at(records: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """Train cost up to `step` (see the module doc), plus the other jobs' totals."""
    train = {f: 0.0 for f in FIELDS}
    other = {f: 0.0 for f in FIELDS}
    start: dict[int, int] = {}
    for r in records:
        if r.get("job") != "train":
            for f in FIELDS:
                other[f] += float(r.get(f) or 0)
            continue
        rank = int(r.get("rank", 0))
        lo = start.get(rank, 0)
        n = int(r.get("steps") or 0)
        start[rank] = lo + n
        share = (1.0 if step >= lo else 0.0) if n <= 0 else min(max(step - lo, 0), n) / n
        for f in FIELDS:
            train[f] += share * float(r.get(f) or 0)
    return {"step": step, **train, "other": other}


def join_costs(target: str | Path, checkpoints: list[dict[str, Any]]) -> str | None:
    """Add `cost` (cost_at the checkpoint's step) to each checkpoint result; returns the ledger used."""
    ledger = find_ledger(target)
    if ledger is None:
        return None
    records = read_ledger(ledger)
    for r in checkpoints:
        r["cost"] = cost_at(records, r["step"]) if r.get("step") is not None else None
    return str(ledger)


def series(checkpoints: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Each score (overall, per category, preference) as (GPU-hours, value) points."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in checkpoints:
        if not r.get("cost"):
            continue
        hours = r["cost"]["device_hours"]
        values = {"overall": r.get("overall"), **{f"drawn {k}": v for k, v in (r.get("drawn") or {}).items()},
                  **{f"preference {Path(k).name}": v for k, v in (r.get("preference") or {}).items()}}  # fmt: skip
        for name, v in values.items():
            if v is not None:
                out.setdefault(name, []).append((hours, float(v)))
    return out


def figure(checkpoints: list[dict[str, Any]], path: Path) -> Path | None:
    """Each score against GPU-hours (PNG at `path`); None when no checkpoint has a cost."""
    lines = series(checkpoints)
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefs = {k: v for k, v in lines.items() if k.startswith("preference")}
    fig, axes = plt.subplots(1, 2 if prefs else 1, figsize=(11 if prefs else 6, 4), squeeze=False)
    for ax, group, label in ((axes[0][0], {k: v for k, v in lines.items() if k not in prefs}, "share / score"),
                             *(((axes[0][1], prefs, "preference score"),) if prefs else ())):  # fmt: skip
        for name, pts in group.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("GPU-hours (train, up to the checkpoint's step)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
