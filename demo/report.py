"""The demo's report: one self-contained HTML page (images inlined) plus a Markdown twin.

Every number on the page comes from the `results` dict that `demo.run` measured; nothing here
computes or invents a figure.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from demo.eval_report import HEADER, eval_headline, eval_intro, eval_rows
from demo.fmt import pct
from shards.fs import write_text


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


def score_rows(score: dict[str, Any], attributes=("color", "position", "shape")) -> list[tuple[str, str, str, str]]:
    """(attribute, accuracy, chance, verdict) rows of a tiny.world score dict."""
    rows = []
    for a in (*attributes, "all"):
        if a not in score:
            continue
        acc, chance = score[a]["accuracy"], score[a]["chance"]
        verdict = "above chance" if acc >= 2 * chance and acc - chance >= 0.15 else "near chance"
        rows.append((a, pct(acc), pct(chance), verdict))
    return rows


def _table(header: list[str], rows: list[tuple | list]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[tuple | list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _claims(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(claim, measured sentence, figure name) for the one-screen summary."""
    t2i = results["t2i"]
    arms, c, aes = t2i["arms"], t2i["claims"], t2i["aesthetic"]
    steps = t2i["steps"]
    frac = c["c_steps_fraction"]
    prior = (f"(c) reached (b)'s final all-three accuracy ({pct(c['b_final_all'])}) at step {c['c_steps_to_b_final']}, "
             f"{pct(frac)} of (b)'s {steps} steps (target: at most 60%)." if frac is not None else
             f"(c) did not reach (b)'s final all-three accuracy ({pct(c['b_final_all'])}) within {steps} steps.")
    prior += f" (c)'s class-conditional DiT stage trained {t2i.get('dit_steps', '?')} steps before, on the {t2i.get('dit_classes', 'shape')} labels."
    prior += prior_sentence(t2i.get("prior"))
    from demo.arms import reach_by_attribute

    by_attr = reach_by_attribute(arms)
    prior += " Per attribute, (c) matched (b)'s final accuracy at step: " + ", ".join(
        f"{a} {by_attr[a] if by_attr[a] is not None else 'never'}" for a in ("color", "position", "shape")) + "."
    cf = arms["c"]["final"]
    prior += (f" Held-out accuracy of (c): colour {pct(cf['color'])}, position {pct(cf['position'])}, "
              f"shape {pct(cf['shape'])}, all three {pct(cf['all'])} (targets 90/90/70/55%).")
    if t2i.get("vae_ceiling"):
        v = t2i["vae_ceiling"]
        prior += (f" Ceiling set by the frozen VAE (the judge on its round trips of real images): colour {pct(v['color'])}, "
                  f"position {pct(v['position'])}, shape {pct(v['shape'])}, all three {pct(v['all'])}.")
    ratio = c["captions_ratio"]
    caps = (f"At step {steps}, all three right on held-out prompts: (b) VLM captions {pct(c['b_final_all'])} against "
            f"(a) alt-texts {pct(c['a_final_all'])}: " + (f"{ratio:.1f}x." if ratio is not None else "(a) got none right."))
    sm, gt = aes["samples"], aes["real_heldout"]
    aest = (f"Aesthetic score of the same {sm['n']} held-out prompts' samples: {sm['before_mean']:.2f} before, "
            f"{sm['after_mean']:.2f} after stage 3 (margin {sm['margin']:+.2f} ± {sm['margin_se']:.2f} s.e.; "
            f"rated below {aes['where'].split('>=')[1].strip()}: {pct(sm['before_low_share'])} → {pct(sm['after_low_share'])}). "
            f"Ground truth: the same head rates real clean held-out images {gt['clean_mean']:.2f} and real degraded ones "
            f"{gt['degraded_mean']:.2f}. All-three accuracy changed by {100 * c['d_all_change']:+.0f} points (allowed: -5).")
    caveat = chance_caveat(arms, t2i)
    prior, caps = prior + caveat, caps + caveat
    v1, v2, v3 = claim_verdicts(results)
    return [("1. A pixel prior (class-conditional DiT, imported by re-parameterisation) gives a head start: " + v1, prior, "curves"),
            ("2. Dense VLM captions teach alignment far faster than alt-texts: " + v2, caps, "samples"),
            ("3. A short aesthetic fine-tune on a selected subset improves the images without losing alignment: " + v3,
             aest, "samples")]


def claim_verdicts(results: dict[str, Any]) -> tuple[str, str, str]:
    """'shown' or 'not shown (why)' for each claim, from the run's own figures, so a heading
    never reads as a claim its measurement does not carry."""
    t2i = results["t2i"]
    c, sm = t2i["claims"], t2i["aesthetic"]["samples"]
    frac = c["c_steps_fraction"]
    if chance_caveat(t2i["arms"], t2i):
        v1 = "not shown (an attribute is at chance, so the all-three figures it rests on are noise)"
    elif frac is None or frac > 0.6:
        v1 = "not shown ((c) did not reach (b)'s final accuracy within 60% of the steps)"
    else:
        v1 = "shown"
    a, b = c["a_final_all"], c["b_final_all"]
    v2 = ("shown" if b >= 3 * a and beyond_noise(b, a, prompt_count(t2i)) else
          "not shown ((b) is not 3x (a) on all three, or the gap is within 2 standard errors)")
    v3 = ("shown" if sm["margin"] > 2 * sm["margin_se"] and c["d_all_change"] >= -0.05 else
          "not shown (the aesthetic gain is within 2 standard errors, or all three fell more than 5 points)")
    return v1, v2, v3


def prior_sentence(prior: dict[str, Any] | None) -> str:
    """What the DiT draws on its own, asked only for its class (before any text)."""
    if not prior:
        return ""
    judged = ", ".join(f"the asked {a} {pct(prior[a])} (chance {pct(prior['chance'][a])})" for a in ("shape", "position") if a in prior)
    return (f" The pixel prior (c) starts from, on its own: asked only for its class on {prior['n']} held-out scenes, "
            f"the DiT (step {prior['step']}) drew {judged}.")


def prompt_count(t2i: dict[str, Any]) -> int:
    """How many held-out prompts each judged checkpoint drew (results record the list or its length)."""
    prompts = t2i.get("prompts", 48)
    return len(prompts) if isinstance(prompts, list) else int(prompts)


def beyond_noise(arm: float, base: float, n: int) -> bool:
    """Whether `arm` beats `base` (two accuracies on the same n prompts) by more than 2 standard errors."""
    se = math.sqrt((arm * (1 - arm) + base * (1 - base)) / n) or 1 / n
    return arm - base > 2 * se


def at_chance(accuracy: float, chance: float, n: int) -> bool:
    """Whether `accuracy` on n prompts is within 2 standard errors (of a guess at `chance`) of chance."""
    return accuracy < chance + 2 * (chance * (1 - chance) / n) ** 0.5


def chance_caveat(arms: dict[str, Any], t2i: dict[str, Any]) -> str:
    """A warning when (b)'s or (c)'s final accuracy on some attribute is within 2 standard errors
    of chance: their all-three accuracy is then the other attributes times a coin flip, and
    comparing arms on it shows noise. ((a) at chance is the alt-texts' effect, not a caveat.)"""
    from tiny.world import OPTIONS

    n = prompt_count(t2i)
    near_chance = []
    for attr in ("color", "position", "shape"):
        chance = 1 / len(OPTIONS[attr])
        finals = {arm: arms[arm]["final"][attr] for arm in ("b", "c") if arms.get(arm, {}).get("final")}
        if any(at_chance(v, chance, n) for v in finals.values()):
            near_chance.append(f"{attr} ({', '.join(f'({a}) {pct(v)}' for a, v in finals.items())}; chance {pct(chance)})")
    if not near_chance:
        return ""
    return (f" Caution: within 2 standard errors of chance at the last step: {'; '.join(near_chance)}. All-three accuracy "
            "is then the other attributes times a coin flip, so the all-three comparisons here show noise, not evidence; "
            "the per-attribute figures are what to read.")


def _curve_rows(arms: dict[str, Any]) -> list[tuple]:
    return [(f"({arm}) {run['label']}", p["step"], pct(p["color"]), pct(p["shape"]), pct(p["position"]), pct(p["all"]))
            for arm, run in arms.items() for p in run["curve"]]


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}"
        ".ex{display:inline-block;width:250px;vertical-align:top;margin:6px;font-size:12px}"
        ".claim{border-left:4px solid #48c;padding:2px 12px;margin:10px 0}")


def write_report(out_dir: Path, results: dict[str, Any], examples: list[dict[str, Any]],
                 plots: dict[str, Path]) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` into `out_dir`; returns both paths.

    Opens with the one-screen summary (the three claims, each with its measured figure and a
    picture), then the details. `examples`: [{"image": PIL, "alt_text", "caption", "split"}];
    `plots`: name -> PNG path (curves, samples, stats plots).
    """
    claims = _claims(results)
    h = _summary_html(results, claims, plots) + _details_html(results, examples, plots, out_dir)
    h.append("<h2>Raw results</h2><pre>" + html.escape(json.dumps(results, indent=1, default=str)) + "</pre></body></html>")
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    for path, text in ((html_path, "\n".join(h)), (md_path, "\n".join(_markdown(results, claims, out_dir)))):
        write_text(path, text)
    return html_path, md_path


def _summary_html(results: dict[str, Any], claims: list[tuple[str, str, str]], plots: dict[str, Path]) -> list[str]:
    """The one screen: the three claims with their figures, the curves and the sample grid."""
    t2i, timing = results["t2i"], results["timing"]
    h = [f"<html><head><meta charset='utf-8'><title>t2i-data demo</title><style>{_CSS}</style></head><body>",
         "<h1>t2i-data demo: PixArt-α's three claims, measured in miniature</h1>",
         f"<p>Seed {results['config']['seed']}, {timing['total_s']:.0f} s for this run of the command (a rerun reuses finished "
         f"stages) on {html.escape(results['machine'])} "
         f"(load average at the end {results.get('load_avg', ['?'])[0]}). Every number below was measured by this run; "
         f"accuracy is judged automatically on {len(t2i['prompts'])} prompts of held-out colour-shape-position combinations.</p>"]
    for title, text, _ in claims:
        h.append(f"<div class='claim'><b>{html.escape(title)}</b><br>{html.escape(text)}</div>")
    if results.get("eval"):
        title, text = eval_headline(results["eval"])
        h.append(f"<div class='claim'><b>{html.escape(title)}</b><br>{html.escape(text)}</div>")
    if "curves" in plots:
        h.append(_img_tag(plots["curves"], 1000))
    if "prior" in plots:
        h.append("<p>The pixel prior on its own: the class-conditional DiT's samples, each titled with the class asked for:</p>")
        h.append(_img_tag(plots["prior"], 800))
    if "samples" in plots:
        h.append("<p>Final samples, one row per arm (a, b, c, d), the same held-out prompt in each column:</p>")
        h.append(_img_tag(plots["samples"], 1000))
        h.append("<p>" + "<br>".join(f"column {i + 1}: {html.escape(p)}" for i, p in enumerate(t2i["prompts"][:10])) + "</p>")
    return h


def _details_html(results: dict[str, Any], examples: list[dict[str, Any]], plots: dict[str, Path], out_dir: Path) -> list[str]:
    """Curves as a table, the aesthetic stage, the captioner, the stats, time and cost."""
    cap, stats, t2i = results["captioner"], results["stats"], results["t2i"]
    sub = t2i["aesthetic"]["subset"]
    h = ["<h2>Details: accuracy against steps</h2>",
         _table(["arm", "step", "colour", "shape", "position", "all three"], _curve_rows(t2i["arms"])),
         *_eval_html(results.get("eval")),
         "<h2>Details: the aesthetic stage (score + select)</h2>",
         f"<p>A tiny CLIP fitted on the world; an aesthetic head fitted (<code>score --fit-aesthetic</code>) on "
         f"{sub['rated']} images rated from the world's ground truth; <code>score</code> rated all {sub['rows']} "
         f"training images ({pct(sub['low_in_training'])} degraded) and <code>select --where \"{html.escape(sub['where'])}\"</code> "
         f"kept {sub['selected']}: precision {pct(sub['precision'])}, recall {pct(sub['recall'])} of the clean ones.</p>",
         "<h2>1. Captioner: a tiny LLaVA trained by the project on the world</h2>",
         f"<p>Trained for {cap['train']['steps']} steps in {cap['train']['train_seconds']:.0f} s. Captioned with the "
         f"<code>{html.escape(cap['backend'])}</code> backend of <code>t2i-data caption</code>. Accuracy of the VLM "
         "captions (parsed for colour, shape, position) on images it never saw:</p>"]
    rows = [(split, *r) for split in ("heldout", "train") if split in cap["accuracy"] for r in score_rows(cap["accuracy"][split])]
    h += [_table(["split", "attribute", "accuracy", "chance", ""], rows), "<h3>Images, their alt-text and their VLM caption</h3>"]
    for ex in examples:
        h.append(f"<div class='ex'>{_img_tag(ex['image'], 128)}<br><b>alt:</b> {html.escape(ex['alt_text'] or '')}<br>"
                 f"<b>VLM:</b> {html.escape(ex['caption'] or '')}<br><i>{ex['split']}</i></div>")
    h += ["<h2>2. Caption statistics: VLM captions against alt-texts</h2>", _table(stats["header"], stats["rows"])]
    h += [_img_tag(plots[name], 420) for name in ("rank_frequency", "nouns_per_caption", "vocabulary_growth") if name in plots]
    h += ["<h2>3. Time per stage</h2>", _table(["stage", "seconds"], [(k, f"{v:.1f}") for k, v in results["timing"].items()])]
    if "cost" in results:
        from costs.summary import PLAN_NOTE, cost_tables

        (h1, r1), (h2, r2) = cost_tables(results["cost"], out_dir)
        h += ["<h2>4. What it cost</h2><p>This run, from the ledgers its jobs wrote (<code>t2i-data cost</code>):</p>",
              _table(h1, r1), f"<p>{html.escape(PLAN_NOTE)}</p>", _table(h2, r2)]
    return h


def _eval_html(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return []
    title, text = eval_headline(ev)
    return [f"<h2>Details: {html.escape(title)}</h2>", f"<p>{eval_intro(ev)}</p>", f"<p><b>{html.escape(text)}</b></p>",
            _table(HEADER, eval_rows(ev))]


def _eval_markdown(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return []
    title, text = eval_headline(ev)
    return [f"## {title}", "", text, "", _md_table(HEADER, eval_rows(ev)), ""]


def _markdown(results: dict[str, Any], claims: list[tuple[str, str, str]], out_dir: Path) -> list[str]:
    """The report's Markdown twin (no images)."""
    cap, stats, t2i = results["captioner"], results["stats"], results["t2i"]
    md = ["# t2i-data demo: PixArt-α's three claims, measured in miniature", "",
          f"Seed {results['config']['seed']}, {results['timing']['total_s']:.0f} s for this run of the command "
          f"(a rerun reuses finished stages) on {results['machine']}.", ""]
    for title, text, _ in claims:
        md += [f"**{title}.** {text}", ""]
    md += ["## Accuracy against steps (held-out combinations)", "",
           _md_table(["arm", "step", "colour", "shape", "position", "all three"], _curve_rows(t2i["arms"])), "",
           *_eval_markdown(results.get("eval")),
           "## Captioner accuracy (VLM captions, parsed)", "",
           _md_table(["split", "attribute", "accuracy", "chance", ""], [(split, *r) for split in cap["accuracy"] for r in score_rows(cap["accuracy"][split])]),
           "", "## Caption statistics", "", _md_table(stats["header"], stats["rows"]), ""]
    if "cost" in results:
        from costs.summary import PLAN_NOTE, cost_tables

        (h1, r1), (h2, r2) = cost_tables(results["cost"], out_dir)
        md += ["## What it cost", "", "This run, from its ledgers:", "", _md_table(h1, r1), "", PLAN_NOTE, "", _md_table(h2, r2), ""]
    return md + ["See report.html for the curves, the sample grids and the plots.", ""]
