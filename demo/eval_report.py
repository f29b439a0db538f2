"""The demo report's eval section: arms (a)-(d) on the suite drawn from their own captions, as the
shipped judge VLM answered it, beside the world's exact judge on the same images (demo.eval_stage).

The headline is computed from arm (c)'s agreement: below the target the section says the judge's
figures are not shown to stand in for the truth, and the exact judge's figures are the ones to read.
"""

from __future__ import annotations

from typing import Any

from demo.eval_stage import AGREEMENT_TARGET
from demo.fmt import pct

CATEGORIES = ("object", "attribute", "relation", "combination")
HEADER = ["arm", *(f"held-out {c}: VLM (exact)" for c in CATEGORIES), "held-out prompts drawn (VLM)", "judges agree",
          "always the commoner answer", "balanced accuracy"]  # fmt: skip


def eval_headline(ev: dict[str, Any]) -> tuple[str, str]:
    """(title, sentence) of the section, from arm (c)'s agreement with the exact judge: shown when it
    reaches the target AND beats a judge that always gives the commoner answer (on blobs the truth
    is mostly no, so saying no to everything agrees often)."""
    c = ev["c"]["agreement"]
    figure = (f"on arm (c)'s samples the judge VLM agrees with the world's exact judge on {pct(c['agree'])} of "
              f"{c['questions']} questions about {c['images']} images (target {pct(AGREEMENT_TARGET)}; "
              f"always giving the commoner answer would agree {pct(c.get('constant'))}; balanced accuracy "
              f"{pct(c.get('balanced'))}; it says yes to {pct(c['vlm_yes'])}, the exact judge to {pct(c['exact_yes'])})")
    agree, constant = c["agree"], c.get("constant")
    if agree is not None and constant is not None and agree >= AGREEMENT_TARGET and agree > constant:
        return "A VLM judge on your own captions' suite: shown", f"Shown: {figure}, so its figures stand in for the truth here."
    return ("A VLM judge on your own captions' suite: not shown",
            f"Not shown: {figure}, so its per-arm figures do not stand in for the truth; read the exact judge's beside them.")


def eval_rows(ev: dict[str, Any]) -> list[tuple]:
    """Per arm: the held-out yes-rate per question category, the VLM's with the exact judge's in
    brackets, the share of held-out prompts (caption wording) the VLM judged fully drawn, the agreement,
    what always giving the commoner answer would agree, and the balanced accuracy."""
    rows = []
    for arm, r in ev.items():
        q, exact = r["questions"], r["agreement"]["exact_questions"]
        cells = [f"{pct(q.get(f'heldout/{c}'))} ({pct(exact.get(f'heldout/{c}'))})" for c in CATEGORIES]
        a = r["agreement"]
        rows.append((f"({arm})", *cells, pct(r["drawn"].get("heldout/caption")), pct(a["agree"]), pct(a.get("constant")),
                     pct(a.get("balanced"))))  # fmt: skip
    return rows


def eval_intro(ev: dict[str, Any]) -> str:
    """What was run, in one paragraph."""
    first = next(iter(ev.values()))
    source = {"caption": "the world's VLM captions", "caption_truth": "the world's ground-truth captions (--quick: its "
              "captioner is too short to name combinations)"}.get(first["captions"], f"the arm shards' {first['captions']!r} field")  # fmt: skip
    return (f"Each arm's final checkpoint was sampled on the same {first['prompts']} prompts that <code>eval --suite own</code> "
            f"drew from {source} (combinations the captions never pair are the held-out split; each is asked "
            "in four wordings), and the shipped judge VLM (<code>python -m demo.judge_vlm</code>) answered their questions. "
            "The world's exact judge read the same images. Per arm, the full eval report: "
            + ", ".join(f"<a href='eval/arm-{arm}/eval.html'>({arm})</a>" for arm in ev) + ".")
