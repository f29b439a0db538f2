"""Does the VLM judge agree with the world's exact judge on a model's own samples? Reads the
judgements an `eval --suite own` run wrote (CHECKPOINT_OUT/judged) and the images it judged,
reads each image again with the exact judge (tiny.judge), and writes the "judge on samples"
section of BENCHMARKS.md (issue 32: >= 90% on the demo's arm (c)).

    t2i-data eval DEMO/t2i/arm-c/checkpoints/step-0000800 --suite own --shards DEMO/t2i_shards_vlm \\
        --judge JUDGE --suite-prompts 20 --out EV
    python benchmarks/judge_on_samples.py EV/step-0000800 --label "default demo, arm (c), seed 0"
    python benchmarks/judge_on_samples.py DEMO/eval/arm-c/step-0000800 ...   # the demo's eval stage; several folders: one block each
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section  # noqa: E402
from demo.eval_stage import AGREEMENT_TARGET, agreement  # noqa: E402
from evals.judge_job import read_judged  # noqa: E402
from shards.reader import ShardError  # noqa: E402


def block(checkpoint_out: Path, label: str) -> list[str]:
    """The section's lines for one `eval --suite own` checkpoint folder."""
    try:
        a = agreement(read_judged(checkpoint_out / "judged"), root=checkpoint_out)
    except ShardError:  # the reader's own line names `caption`; these shards are the judge's
        a = {"questions": 0}
    if not a["questions"]:
        print(f"{checkpoint_out}/judged holds no complete judge shards with an answer: rerun its `eval --suite own`", file=sys.stderr)
        sys.exit(2)
    verdict = "reaches" if a["agree"] >= AGREEMENT_TARGET and a["agree"] > a["constant"] else "does NOT reach"
    return [f"{label or checkpoint_out}: {a['questions']} questions about {a['images']} sampled images "
            f"(`eval --suite own`), each image read again by the world's exact judge.", "",
            f"- **The judge {verdict} {AGREEMENT_TARGET:.0%}: {a['agree']:.1%} of the questions agree** "
            f"({a['images_all_agree']:.1%} of the images on every question).",
            "- By category: " + ", ".join(f"{c} {v:.1%}" for c, v in a["by_category"].items()) + ".",
            f"- Yes: the exact judge {a['exact_yes']:.1%}, the VLM judge {a['vlm_yes']:.1%}. A judge always giving the "
            f"commoner answer would agree {a['constant']:.1%}; balanced accuracy (the mean of the shares of true yes and "
            f"true no it gets) {a['balanced']:.1%}.", ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint_out", type=Path, nargs="+", help="eval --suite own outputs' step-* folders")
    ap.add_argument("--label", action="append", default=[], help="what each checkpoint is, in order (repeat)")
    args = ap.parse_args()
    for folder in args.checkpoint_out:
        if not (folder / "judged").is_dir():
            print(f"{folder} holds no judged/ folder: pass a step-* folder of an `eval --suite own` output", file=sys.stderr)
            sys.exit(2)
    labels = args.label + [""] * (len(args.checkpoint_out) - len(args.label))
    body = [f"'Reaches' needs {AGREEMENT_TARGET:.0%} agreement AND more than a judge that always gives the commoner answer "
            "would agree: on blobs the truth is mostly no, so saying no to everything can pass the bar alone.", ""]
    body += [line for folder, label in zip(args.checkpoint_out, labels) for line in block(folder, label)]
    write_section("judge on samples", "\n".join(body).rstrip())


if __name__ == "__main__":
    main()
