"""The suite eval's outputs: `suite_<suite>.json` (every figure), `eval.html` (per checkpoint, a
bar per question category and per split x wording (own) or per benchmark category (public suites),
the preference scores, the worst-judged questions of each category with their images) and, when
the run has a ledger, `quality_cost.png`: each score against the GPU-hours spent to reach it."""

from __future__ import annotations

import html
import json
import os
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


INTRO = {"own": "held-out combinations the captions never pair, and seen ones, each in 4 wordings",
         "geneval": "GenEval's 553 prompts; questions from its metadata: presence, count, colour, position",
         "t2i-compbench": "T2I-CompBench's val prompts; one VQAScore question per prompt",
         "dpg": "DPG-Bench's dense prompts with their own questions and dependencies"}  # fmt: skip


def _numbers(title: str, values: dict[str, float | None]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='n'>{'n/a' if v is None else f'{v:.4g}'}</td></tr>"
                   for k, v in values.items())  # fmt: skip
    return f"<h3>{html.escape(title)}</h3><table>{rows}</table>"


def _worst(out: Path, worst: dict[str, list[dict[str, Any]]]) -> str:
    parts = ["<h3>worst-judged questions per category</h3><table>"]
    for cat, items in worst.items():
        for w in items:
            src = html.escape(os.path.relpath(w["image"], out))
            parts.append(f"<tr><td>{html.escape(cat)}</td><td><img src='{src}' width='96'></td><td>{html.escape(w['prompt'] or '')}"
                         f"<br><i>{html.escape(w['question'])}</i> {w['answer']} (P(Yes) {w['score']:.3f})</td></tr>")  # fmt: skip
    return "".join(parts) + "</table>"


def _checkpoint(out: Path, r: dict[str, Any], own: bool) -> list[str]:
    parts = [f"<h2>{html.escape(r['name'])} (step {r['step']})</h2>"]
    if r.get("cost"):
        c = r["cost"]
        parts.append(f"<p>cost up to this step: {c['device_hours']:.4g} GPU-hours, {c['energy_kwh']:.4g} kWh, "
                     f"{c['kg_co2e']:.4g} kg CO2e (train, from the run's ledger)</p>")  # fmt: skip
    if not own:
        parts.append(f"<p>overall: {'n/a' if r['overall'] is None else format(r['overall'], '.3f')}</p>")
        parts.append(_bars("prompts fully drawn (every question yes), per category", r["drawn"]))
        parts.append(_bars("score per category (mean over prompts; DPG: dependencies applied)", r["score"]))
        parts.append(_bars("VQAScore (mean P(Yes)) per category", r["vqascore"]))
    parts.append(_bars("questions answered yes, per " + ("split / category" if own else "question kind"), r["questions"]))
    if own:
        parts.append(_bars("prompts drawn, per split / wording", r["drawn"]))
    if r.get("preference"):
        parts.append(_numbers("preference score (mean; CLIP models: exp(logit_scale) x cosine; ImageReward: its normalised reward)",
                              r["preference"]))
    return parts + [_worst(out, r.get("worst") or {})]


def to_html(report: dict[str, Any], out: Path = Path(".")) -> str:
    suite = report["suite"]
    parts = [f"<html><head><meta charset='utf-8'><title>t2i-data eval --suite {html.escape(suite)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>eval --suite {html.escape(suite)}: {html.escape(report['target'])}</h1>",
             f"<p>{report['prompts']} prompts ({INTRO.get(suite, suite)}), judged by <code>{html.escape(report['judge'])}"
             "</code> (P(Yes) from the first answer token; a prompt is drawn when every one of its questions is answered yes).</p>"]  # fmt: skip
    if report.get("cost_figure"):
        parts.append(f"<h2>Quality against cost</h2><p>from {html.escape(str(report['cost_ledger']))}</p>"
                     f"<img src='{html.escape(os.path.relpath(report['cost_figure'], out))}'>")  # fmt: skip
    for r in report["checkpoints"]:
        parts += _checkpoint(out, r, suite == "own")
    parts.append("<h2>Raw results</h2><pre>" + html.escape(json.dumps(report, indent=1)) + "</pre></body></html>")
    return "\n".join(parts)


def write_suite_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write `suite_<suite>.json`, `eval.html` and (with costs) `quality_cost.png` into `out`
    (atomically); returns their paths."""
    from evals.cost import figure

    files = [out / f"suite_{report['suite']}.json", out / "eval.html"]
    fig = figure(report["checkpoints"], out / "quality_cost.png")
    report["cost_figure"] = str(fig) if fig else None
    files += [fig] if fig else []
    write_text(files[0], json.dumps({**report, "files": [str(p) for p in files]}, indent=2, default=str))
    write_text(files[1], to_html(report, out))
    return files
