"""`t2i-data cost`: what finished runs cost, from the ledgers their jobs wrote (shards.ledger)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards import fs
from shards.checks import decode_text
from shards.errors import UserError
from shards.ledger import LEDGER


@dataclass
class CostConfig:
    """The cost command's settings (its flags map 1:1): run directories, and JSON or Markdown."""

    run_dirs: list[str]
    json_out: bool = False  # print JSON instead of Markdown


def cost_command(cfg: CostConfig) -> str:
    """`t2i-data cost`: the ledgers under `cfg.run_dirs` summed, as the command prints them."""
    result = sum_ledgers(cfg.run_dirs)
    return json.dumps(result, indent=2) if cfg.json_out else cost_markdown(result)


def find_ledgers(run_dirs: list[str]) -> list:
    """Every ledger.jsonl under the given run directories (recursively for local ones)."""
    found = []
    for d in run_dirs:
        loc = fs.as_location(d)
        if isinstance(loc, Path):
            if not loc.exists():
                raise UserError(f"{d} not found: pass a run directory of caption, features or train")
            hits = [loc] if loc.is_file() else sorted(p for p in loc.rglob(LEDGER) if p.is_file())
        else:
            hits = [p for p in [fs.join(loc, LEDGER)] if fs.exists(p)]
        if not hits:
            raise UserError(f"no {LEDGER} in {d}: it is written by caption, features and train runs")
        found += hits
    return found


RECORD_FIELDS = {"job": str, "device_hours": (int, float), "energy_kwh": (int, float), "kg_co2e": (int, float),
                 "energy_source": str, "device_name": str}


def ledger_records(path: fs.Location) -> list[dict[str, Any]]:
    """The records of one ledger file; a one-line UserError naming `file:line` for a file or a
    line that is not the JSON a ledger holds (binary, not UTF-8, damaged)."""
    fix = "pass the run directory of caption, score, select, features or train, or delete the line"
    text = decode_text(fs.read_bytes(path), str(path), fix)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{n} is not a JSON line: {fix}") from None
        bad = [k for k, kind in RECORD_FIELDS.items() if not isinstance(r, dict) or not isinstance(r.get(k), kind)]
        if bad:
            raise UserError(f"{path}:{n} is not a ledger record (no {', '.join(bad)}): {fix}")
        records.append(r)
    return records


def sum_ledgers(run_dirs: list[str]) -> dict[str, Any]:
    """One row per (ledger file, job) with its runs summed, and the totals."""
    rows = []
    for path in find_ledgers(run_dirs):
        groups: dict[str, dict[str, Any]] = {}
        for r in ledger_records(path):
            g = groups.setdefault(r["job"], {"where": str(path)[: -len(LEDGER) - 1] or ".", "job": r["job"], "runs": 0,
                                             "device_hours": 0.0, "energy_kwh": 0.0, "kg_co2e": 0.0, "sources": set(), "devices": set()})
            g["runs"] += 1
            for k in ("device_hours", "energy_kwh", "kg_co2e"):
                g[k] += r[k]
            g["sources"].add(r["energy_source"].split(":")[0])
            g["devices"].add(r["device_name"])
        rows += [{**g, "sources": sorted(g["sources"]), "devices": sorted(g["devices"])} for g in groups.values()]
    totals = {k: sum(r[k] for r in rows) for k in ("runs", "device_hours", "energy_kwh", "kg_co2e")}
    return {"rows": rows, "totals": totals}


def cost_markdown(result: dict[str, Any]) -> str:
    """`t2i-data cost` as a Markdown table."""
    lines = ["| run | job | runs | device | device-hours | kWh | kgCO2e | energy from |", "|---|---|---:|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['where']} | {r['job']} | {r['runs']} | {', '.join(r['devices'])} | {r['device_hours']:.4g} | "
                     f"{r['energy_kwh']:.4g} | {r['kg_co2e']:.4g} | {', '.join(r['sources'])} |")
    t = result["totals"]
    lines.append(f"| **total** | | {t['runs']} | | {t['device_hours']:.4g} | {t['energy_kwh']:.4g} | {t['kg_co2e']:.4g} | |")
    return "\n".join(lines) + "\n"
