"""Does the VLM judge agree with the world's exact judge on a model's own samples? Reads the
judgements an `eval --suite own` run wrote (CHECKPOINT_OUT/judged) and the images it judged,
reads each image again with the exact judge (tiny.judge), and writes the "judge on samples"
section of BENCHMARKS.md (issue 32: >= 90% on the demo's arm (c)).

    t2i-data eval DEMO/t2i/arm-c/checkpoints/step-0000800 --suite own --shards DEMO/t2i_shards_vlm \\
        --judge JUDGE --suite-prompts 20 --out EV
    python benchmarks/judge_on_samples.py EV/step-0000800 --label "default demo, arm (c), seed 0"
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section  # noqa: E402
from shards import iter_batches  # noqa: E402
from tiny import judge as J  # noqa: E402

TARGET = 0.90


def agreement(judged_dir: Path) -> tuple[dict[str, list[bool]], dict[str, list[bool]], float, float]:
    """({image: [agrees per question]}, {category: [...]}, exact yes share, judge yes share)."""
    by_image, by_category, exact_yes, vlm_yes, readings = defaultdict(list), defaultdict(list), [], [], {}
    for batch in iter_batches(judged_dir / "judged", columns=["image", "question", "category", "answer"]):
        for row in batch.to_pylist():
            if row["image"] not in readings:
                path = Path(row["image"]) if Path(row["image"]).is_absolute() else judged_dir / row["image"]
                readings[row["image"]] = J.judge_image(Image.open(path).convert("RGB"))
            exact = J.answer_question(row["question"], readings[row["image"]])
            same = (row["answer"] == "yes") == exact
            by_image[row["image"]].append(same)
            by_category[row["category"].split("/")[-1]].append(same)
            exact_yes.append(exact)
            vlm_yes.append(row["answer"] == "yes")
    return by_image, by_category, float(np.mean(exact_yes)), float(np.mean(vlm_yes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint_out", type=Path, help="an eval --suite own output's step-* folder")
    ap.add_argument("--label", default="", help="what the checkpoint is, for the section")
    args = ap.parse_args()
    if not (args.checkpoint_out / "judged").is_dir():
        print(f"{args.checkpoint_out} holds no judged/ folder: pass a step-* folder of an `eval --suite own` output", file=sys.stderr)
        sys.exit(2)
    by_image, by_category, exact_yes, vlm_yes = agreement(args.checkpoint_out)
    questions = [x for v in by_image.values() for x in v]
    share = float(np.mean(questions))
    verdict = "reaches" if share >= TARGET else "does NOT reach"
    body = [f"{args.label or args.checkpoint_out}: {len(questions)} questions about {len(by_image)} sampled images "
            f"(`eval --suite own`), each image read again by the world's exact judge.", "",
            f"- **The judge {verdict} {TARGET:.0%}: {share:.1%} of the questions agree** "
            f"({np.mean([all(v) for v in by_image.values()]):.1%} of the images on every question).",
            "- By category: " + ", ".join(f"{c} {np.mean(v):.1%}" for c, v in sorted(by_category.items())) + ".",
            f"- Yes: the exact judge {exact_yes:.1%}, the VLM judge {vlm_yes:.1%}."]
    write_section("judge on samples", "\n".join(body))


if __name__ == "__main__":
    main()
