"""The demo's eval stage: every arm's final checkpoint judged on a suite drawn from the world's own
VLM captions (`t2i-data eval --suite own`, evals.suite) by the judge VLM the demo ships
(demo/assets/tiny_judge, fitted offline by `python -m demo.judge_vlm`), and that judge checked
against the world's exact judge (tiny.judge) on the very images it judged.

On the demo world the truth is known, so the report can say whether the VLM judge's figures may
stand in for it: `agreement` is the share of questions on which the two judges give the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from tiny import judge as J

AGREEMENT_TARGET = 0.90  # issue 32: the own suite's judgement of arm (c) agrees with the exact judge on >= 90%


@dataclass
class EvalStageSettings:
    """What the stage runs with: the judge, the suite's size (combinations per split, each asked in
    four wordings), the shards' field it is drawn from and how often a combination must occur
    there to count as seen, and the arms' sampler."""

    judge: str
    prompts: int
    min_count: int
    captions: str  # the shards' field the suite is drawn from
    sampler_steps: int
    seed: int
    batch_size: int = 32


def agreement(rows: Iterable[Mapping[str, Any]], root: Path | None = None) -> dict[str, Any]:
    """The VLM judge's answers (judge shards' rows) against the exact judge's reading of the same
    images: the share that agree (per '<split>/<question category>' too, and the share of images on
    which every question agrees), both judges' yes-rates, the balanced accuracy (the mean of the
    share of true yes and of true no it gets) and what a judge always giving the commoner answer
    would agree (when the truth is mostly no, a judge saying no to everything agrees that often).
    A relative image path is read from `root` when it is not found as it is."""
    from PIL import Image

    readings: dict[str, dict] = {}
    judged = []  # (category, image, the VLM said yes, the exact judge says yes), one per answered question
    for row in rows:
        if row.get("error") is not None:
            continue
        image = row["image"]
        if image not in readings:
            path = Path(image)
            path = path if path.exists() or root is None else root / path
            readings[image] = J.judge_image(Image.open(path).convert("RGB"))
        split, *_, cat = row["category"].split("/")
        judged.append((f"{split}/{cat}", image, row["answer"] == "yes", J.answer_question(row["question"], readings[image])))
    agree = [said == exact for _, _, said, exact in judged]
    recall = [_mean([a for a, j in zip(agree, judged) if j[3] == side]) for side in (True, False)]
    yes_share = _mean([exact for *_, exact in judged])
    by_category = _grouped(judged, agree, lambda j: j[0])
    return {"questions": len(judged), "images": len(readings), "agree": _mean(agree),
            "balanced": None if None in recall else sum(recall) / 2,  # the mean of the yes- and no-recall
            "constant": None if yes_share is None else max(yes_share, 1 - yes_share),  # always the commoner answer
            "images_all_agree": _mean([all(v) for v in _grouped(judged, agree, lambda j: j[1]).values()]),
            "by_category": {k: _mean(v) for k, v in by_category.items()},
            "exact_questions": {k: _mean(v) for k, v in _grouped(judged, [j[3] for j in judged], lambda j: j[0]).items()},
            "exact_yes": yes_share, "vlm_yes": _mean([j[2] for j in judged])}  # fmt: skip


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _grouped(items: list, values: list, key) -> dict[str, list]:
    """`values` (one per item) grouped by `key(item)`, keys sorted."""
    out: dict[str, list] = {}
    for item, value in zip(items, values):
        out.setdefault(key(item), []).append(value)
    return dict(sorted(out.items()))


def eval_arm(checkpoint: Path, shards: Path, out: Path, s: EvalStageSettings) -> dict[str, Any]:
    """One arm: `eval --suite own` on its checkpoint into `out` (resumable: sampled PNGs and judged
    questions are kept), then the judge's agreement with the exact judge on those images."""
    from evals.judge_job import read_judged
    from evals.suite import SuiteConfig, run_suite
    from t2i.evaluate import safe_name

    cfg = SuiteConfig(suite="own", shards=shards, out=out, judge=s.judge, suite_prompts=s.prompts, min_count=s.min_count, caption_column=s.captions, steps=s.sampler_steps,
                      seed=s.seed, batch_size=s.batch_size, progress=False)  # fmt: skip
    report = run_suite(checkpoint, cfg)
    result = report["checkpoints"][-1]
    rows = read_judged(out / safe_name(result["name"]) / "judged")
    return {"checkpoint": str(checkpoint), "captions": s.captions, "prompts": report["prompts"], "questions": result["questions"],
            "drawn": result["drawn"], "agreement": agreement(rows), "html": str(out / "eval.html")}  # fmt: skip


def eval_arms(arm_dirs: Mapping[str, Path], shards: Path, out: Path, s: EvalStageSettings) -> dict[str, Any]:
    """Every arm's last checkpoint on the same suite (built once from `shards`, then copied to each
    arm's folder so all four answer the same prompts); {arm: eval_arm(...)}."""
    from demo.arms import checkpoints
    from evals.suite import SUITE_SETTINGS
    from shards.fs import write_text

    results: dict[str, Any] = {}
    first = None
    for arm, stage_dir in arm_dirs.items():
        arm_out = out / f"arm-{arm}"
        if first is not None and not (arm_out / "suite.jsonl").is_file():
            arm_out.mkdir(parents=True, exist_ok=True)
            for name in (SUITE_SETTINGS, "suite.jsonl"):  # the settings first, as evals.suite writes them
                write_text(arm_out / name, (first / name).read_text())
        results[arm] = eval_arm(checkpoints(stage_dir)[-1][1], shards, arm_out, s)
        first = first or arm_out
    return results
