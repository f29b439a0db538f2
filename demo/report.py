"""The demo's report: one self-contained HTML page (images inlined) plus a Markdown twin.

Every number on the page comes from the `results` dict that `demo.run` measured; nothing here
computes or invents a figure.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image


def _img_tag(img: Image.Image | Path, width: int | None = None, title: str = "") -> str:
    if isinstance(img, Path):
        data = img.read_bytes()
    else:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    w = f' width="{width}"' if width else ""
    t = f' title="{html.escape(title)}"' if title else ""
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}"{w}{t} style="image-rendering:pixelated">'


def _pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.0f}%"


def score_rows(score: dict[str, Any], attributes=("color", "position", "shape")) -> list[tuple[str, str, str, str]]:
    """(attribute, accuracy, chance, verdict) rows of a demo.world score dict."""
    rows = []
    for a in (*attributes, "all"):
        if a not in score:
            continue
        acc, chance = score[a]["accuracy"], score[a]["chance"]
        verdict = "above chance" if acc >= 2 * chance and acc - chance >= 0.15 else "near chance"
        rows.append((a, _pct(acc), _pct(chance), verdict))
    return rows


def _table(header: list[str], rows: list[tuple | list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[tuple | list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, Any], examples: list[dict[str, Any]],
                 samples: list[dict[str, Any]], plots: dict[str, Path]) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` into `out_dir`; returns both paths.

    `examples`: [{"image": PIL, "alt_text", "caption", "split"}]; `samples`: [{"image": PIL,
    "prompt", "split", "judged": {...}}]; `plots`: name -> PNG path.
    """
    cap, stats, t2i = results["captioner"], results["stats"], results["t2i"]
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}"
           ".ex{display:inline-block;width:250px;vertical-align:top;margin:6px;font-size:12px}"
           ".s{display:inline-block;width:130px;vertical-align:top;margin:4px;font-size:11px}")
    h = [f"<html><head><meta charset='utf-8'><title>t2i-data demo</title><style>{css}</style></head><body>",
         "<h1>t2i-data demo: the PixArt-α recipe in miniature</h1>",
         f"<p>Seed {results['config']['seed']}, {results['timing']['total_s']:.0f} s on {html.escape(results['machine'])}. "
         "Every number below was measured by this run.</p>"]

    h.append("<h2>1. Captioner: a tiny LLaVA trained by the project on the world</h2>")
    h.append(f"<p>Trained for {cap['train']['steps']} steps in {cap['train']['train_seconds']:.0f} s. Captioned with the "
             f"<code>{html.escape(cap['backend'])}</code> backend of <code>t2i-data caption</code>. Accuracy of the VLM "
             "captions (parsed for colour, shape, position) on images it never saw:</p>")
    rows = [(split, *r) for split in ("heldout", "train") if split in cap["accuracy"] for r in score_rows(cap["accuracy"][split])]
    h.append(_table(["split", "attribute", "accuracy", "chance", ""], rows))
    h.append("<p>Held-out images use (colour, shape, position) combinations that never appear in the captioner's or the "
             "T2I model's training data.</p>")
    h.append("<h3>Images, their alt-text and their VLM caption</h3>")
    for ex in examples:
        h.append(f"<div class='ex'>{_img_tag(ex['image'], 128)}<br><b>alt:</b> {html.escape(ex['alt_text'] or '')}<br>"
                 f"<b>VLM:</b> {html.escape(ex['caption'] or '')}<br><i>{ex['split']}</i></div>")

    h.append("<h2>2. Caption statistics: VLM captions against alt-texts</h2>")
    h.append(_table(stats["header"], stats["rows"]))
    for name in ("rank_frequency", "nouns_per_caption", "vocabulary_growth"):
        if name in plots:
            h.append(_img_tag(plots[name], 420))

    h.append("<h2>3. Text-to-image: a tiny PixArt-α trained on the VLM captions</h2>")
    h.append(f"<p>{t2i['steps']} steps, {t2i['samples']} training images at {t2i['resolution']} px, "
             f"{t2i['seconds']:.0f} s. Generated images judged automatically (object colour, position, shape):</p>")
    rows = [(split, *r) for split in ("train-combos", "heldout-combos") if split in t2i["score"] for r in score_rows(t2i["score"][split])]
    h.append(_table(["prompts", "attribute", "accuracy", "chance", ""], rows))
    if "loss" in plots:
        h.append(_img_tag(plots["loss"], 480))
    h.append("<h3>Samples per prompt</h3>")
    for s in samples:
        j = s["judged"]
        h.append(f"<div class='s'>{_img_tag(s['image'], 96)}<br>{html.escape(s['prompt'])}<br>"
                 f"<i>{s['split']}; judged: {j.get('color')}, {j.get('position')}, {j.get('shape')}</i></div>")
    if "cost" in results:
        from costs.summary import PLAN_NOTE, cost_tables

        (h1, r1), (h2, r2) = cost_tables(results["cost"], out_dir)
        h += ["<h2>4. What it cost</h2><p>This run, from the ledgers its jobs wrote (<code>t2i-data cost</code>):</p>",
              _table(h1, r1), f"<p>{html.escape(PLAN_NOTE)}</p>", _table(h2, r2)]
    h.append("<h2>Raw results</h2><pre>" + html.escape(json.dumps(results, indent=1, default=str)) + "</pre></body></html>")

    md = ["# t2i-data demo", "", f"Seed {results['config']['seed']}, {results['timing']['total_s']:.0f} s on {results['machine']}.", "",
          "## Captioner accuracy (VLM captions, parsed)", "",
          _md_table(["split", "attribute", "accuracy", "chance", ""], [(split, *r) for split in cap["accuracy"] for r in score_rows(cap["accuracy"][split])]),
          "", "## Caption statistics", "", _md_table(stats["header"], stats["rows"]), "",
          "## Text-to-image alignment (generated images, judged)", "",
          _md_table(["prompts", "attribute", "accuracy", "chance", ""], [(split, *r) for split in t2i["score"] for r in score_rows(t2i["score"][split])]),
          ""]
    if "cost" in results:
        (h1, r1), (h2, r2) = cost_tables(results["cost"], out_dir)
        md += ["## What it cost", "", "This run, from its ledgers:", "", _md_table(h1, r1), "", PLAN_NOTE, "", _md_table(h2, r2), ""]
    md += ["See report.html for images and plots.", ""]
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    for path, text in ((html_path, "\n".join(h)), (md_path, "\n".join(md))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return html_path, md_path
