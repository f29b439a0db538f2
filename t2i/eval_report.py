"""`t2i-data eval`'s outputs: `eval.json` (every figure) and `eval.html` (a table with one row per
checkpoint, best value of each column in bold, and the checkpoints' sample grids side by side).
The page links the grid PNGs next to it rather than inlining them, so it stays small for long
runs; every number on it comes from the JSON."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from shards.fs import write_text

# column, header, format, better ("high" / "low")
COLUMNS = (
    ("clip_score", "CLIPScore (cosine)", "{:.4f}", "high"),
    ("aesthetic", "aesthetic", "{:.3f}", "high"),
    ("fid", "FID", "{:.3f}", "low"),
    ("kid", "KID (x1000)", "{:.3f}", "low"),
)

CSS = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
       "padding:4px 8px;text-align:right}th{background:#eee}.grids{display:flex;flex-wrap:wrap;gap:16px}"
       ".grids figure{margin:0}pre{white-space:pre-wrap}.grids img{image-rendering:pixelated;width:512px;max-width:90vw}")  # fmt: skip


def summary_lines(report: dict[str, Any]) -> str:
    """What `t2i-data eval` prints: a line per checkpoint (CLIPScore, aesthetic and FID when
    measured, samples), then the files written."""
    lines = []
    for r in report["checkpoints"]:
        fid = "" if r["fid"] is None else f", FID {r['fid']:.3f}"
        fid += "" if r.get("kid") is None else f", KID {1000 * r['kid']:.3f}e-3 ± {1000 * r['kid_std']:.3f}e-3"
        aes = "" if r["aesthetic"] is None else f", aesthetic {r['aesthetic']:.3f}"
        lines.append(f"{r['name']}: CLIPScore {r['clip_score']:.4f}{aes}{fid} ({r['samples']} samples)")
    return "\n".join([*lines, f"wrote {', '.join(report['files'])}"])


def _best(rows: list[dict[str, Any]], key: str, better: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    if len(values) < 2:
        return None
    return max(values) if better == "high" else min(values)


def _cell(row: dict[str, Any], key: str, fmt: str, best: float | None) -> str:
    value = row.get(key)
    if value is None:
        return "<td>n/a</td>"
    if key == "kid":  # shown x1000 (its usual scale), with its std over subsets
        return _bold(f"{1000 * value:.3f} ± {1000 * row['kid_std']:.3f}", best is not None and value == best)
    text = fmt.format(value) + (f" ± {row['clip_score_std']:.4f}" if key == "clip_score" else "")
    return f"<td><b>{text}</b></td>" if best is not None and value == best else f"<td>{text}</td>"


def _bold(text: str, bold: bool) -> str:
    return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"


def to_html(report: dict[str, Any]) -> str:
    rows = report["checkpoints"]
    best = {key: _best(rows, key, better) for key, _, _, better in COLUMNS}
    head = "".join(f"<th>{h}</th>" for h in ("checkpoint", "step", "samples", *(c[1] for c in COLUMNS)))
    body = []
    for r in rows:
        cells = [f"<td style='text-align:left'>{html.escape(r['name'])}</td>", f"<td>{r['step'] if r['step'] is not None else ''}</td>",
                 f"<td>{r['samples']}</td>", *(_cell(r, key, fmt, best[key]) for key, _, fmt, _ in COLUMNS)]  # fmt: skip
        body.append("<tr>" + "".join(cells) + "</tr>")
    ref = report.get("reference")
    fid_note = (f"FID and KID on {html.escape(ref['features'])} features against {ref['images']} images of "
                f"<code>{html.escape(ref['folder'])}</code>." if ref else "No --reference: no FID.")  # fmt: skip
    grids = "".join(f"<figure><img src='{html.escape(r['grid'])}' alt='{html.escape(r['name'])}'>"
                    f"<figcaption>{html.escape(r['name'])}</figcaption></figure>" for r in rows)  # fmt: skip
    s = report["settings"]
    return "\n".join([
        f"<html><head><meta charset='utf-8'><title>t2i-data eval</title><style>{CSS}</style></head><body>",
        f"<h1>eval: {html.escape(report['target'])}</h1>",
        f"<p>{report['prompts']} prompts, {s['steps']} DPM-Solver++ steps, guidance {s['guidance']}, seed {s['seed']}; "
        f"CLIP <code>{html.escape(s['clip'])}</code>. {fid_note} Best of each column in bold.</p>",
        f"<table><tr>{head}</tr>{''.join(body)}</table>",
        f"<h2>Samples (first {len(report.get('grid_prompts', []))} prompts, same seeds for every checkpoint)</h2>",
        f"<div class='grids'>{grids}</div>",
        "<details><summary>prompts of the grids (row by row)</summary><ol>"
        + "".join(f"<li>{html.escape(p)}</li>" for p in report.get("grid_prompts", [])) + "</ol></details>",
        "<h2>Raw results</h2><pre>" + html.escape(json.dumps(report, indent=1)) + "</pre></body></html>",
    ])  # fmt: skip


def write_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """Write `eval.json` and `eval.html` into `out` (each atomically); returns their paths."""
    out = Path(out)
    json_path, html_path = out / "eval.json", out / "eval.html"
    files = [json_path, html_path]
    write_text(json_path, json.dumps({**report, "files": [str(p) for p in files]}, indent=2))
    write_text(html_path, to_html(report))
    return files
