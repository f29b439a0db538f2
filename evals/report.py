"""The suite eval's outputs: `suite_<suite>.json` (every figure) and `eval.html` (per checkpoint,
a bar per question category and per split x wording, the worst-judged questions of each
category with their images)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from shards.fs import write_text

CSS = ("body{font-family:sans-serif;margin:2em}.bar{background:#4a7;height:14px;display:inline-block}"
       "td{padding:2px 8px}td.n{text-align:right}h2{margin-top:1.5em}")  # fmt: skip


def _bars(title: str, values: dict[str, float | None]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='n'>{'n/a' if v is None else f'{v:.0%}'}</td>"
                   f"<td><span class='bar' style='width:{0 if v is None else round(300 * v)}px'></span></td></tr>"
                   for k, v in values.items())  # fmt: skip
    return f"<h3>{html.escape(title)}</h3><table>{rows}</table>"


def to_html(report: dict[str, Any]) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>t2i-data eval --suite {html.escape(report['suite'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>eval --suite {html.escape(report['suite'])}: {html.escape(report['target'])}</h1>",
             f"<p>{report['prompts']} prompts (held-out combinations the captions never pair, and seen ones, each in 4 "
             f"wordings), judged by <code>{html.escape(report['judge'])}</code> (P(Yes) from the first answer token; "
             "a prompt is drawn when every one of its questions is answered yes).</p>"]  # fmt: skip
    for r in report["checkpoints"]:
        parts.append(f"<h2>{html.escape(r['name'])} (step {r['step']})</h2>")
        parts.append(_bars("questions answered yes, per split / category", r["questions"]))
        parts.append(_bars("prompts drawn, per split / wording", r["drawn"]))
    parts.append("<h2>Raw results</h2><pre>" + html.escape(json.dumps(report, indent=1)) + "</pre></body></html>")
    return "\n".join(parts)


def write_suite_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write `suite_<suite>.json` and `eval.html` into `out` (atomically); returns their paths."""
    files = [out / f"suite_{report['suite']}.json", out / "eval.html"]
    write_text(files[0], json.dumps({**report, "files": [str(p) for p in files]}, indent=2, default=str))
    write_text(files[1], to_html(report))
    return files
