"""GenEval's detector checks with a transformers open-vocabulary detector (`--detector`): OWLv2 /
OWL-ViT (or Grounding DINO) by HF id or directory, through AutoModelForZeroShotObjectDetection.

GenEval's protocol (djghosh13/geneval evaluation/evaluate_images.py) detects each class of a prompt,
keeps boxes above a confidence threshold (most confident first), and checks:
- presence / count: at least `count` boxes of the class, and fewer than an `exclude` count;
- position: every kept box of the object stands in the asked relation to every kept box of its
  target, centres compared after shrinking the offset by 0.1 x the boxes' sizes (`relative_position`).
Colour (GenEval: CLIP on the crops) stays with the VLM judge. Differences: the official detector is
Mask2Former on COCO's 80 classes (threshold 0.3, 0.9 for counting, no NMS); an open-vocabulary
detector returns the best class per box among the prompt's queries ("a photo of a <class>"), and
overlapping boxes of a class (IoU > 0.5) are merged (NMS), since OWLv2 proposes many per object.

`DetectorScorer.score_records` answers the judge job's records (evals.judge_job: shards, resume,
ledger) whose `detect` field names the prompt's metadata and the question's index.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np

POSITION_THRESHOLD = 0.1
NMS_IOU = 0.5


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    area = lambda x: max(x[2] - x[0], 0) * max(x[3] - x[1], 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Where box A is relative to box B (GenEval's rule, boxes as x0, y0, x1, y1)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=float).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {r for r, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5)) if hit}


def geneval_answers(meta: dict[str, Any], found: dict[str, list[tuple[float, list[float]]]]) -> list[tuple[bool, float] | None]:
    """(yes, score) per question of evals.public.geneval_questions(meta), None for colour ones;
    `found`: class -> [(confidence, box)], most confident first."""
    out: list[tuple[bool, float] | None] = []
    groups: list[list | None] = []
    excluded = {e["class"]: e["count"] for e in meta.get("exclude", [])}
    for entry in meta["include"]:
        boxes = found.get(entry["class"], [])
        kept = boxes[: entry["count"]]
        ok = len(kept) >= entry["count"] and len(boxes) < excluded.get(entry["class"], 10**9)
        out.append((ok, kept[-1][0] if len(kept) >= entry["count"] else 0.0))
        if entry.get("color"):
            out.append(None)
        matched = ok
        if entry.get("position"):
            rel, target = entry["position"]
            others = groups[target] if target < len(groups) else None
            matched = ok and others is not None and all(rel in relative_position(a[1], b[1]) for a in kept for b in others)
            out.append((matched, float(matched)))
        groups.append(kept if matched else None)
    return out


def class_of(label: str, classes: Sequence[str]) -> str | None:
    """The class a detector's label names: itself (OWLv2 returns the class given), else the longest
    class inside it (Grounding DINO decodes the matched words of its query: "a photo of a dog")."""
    if label in classes:
        return label
    inside = [c for c in classes if c in str(label)]
    return max(inside, key=len) if inside else None


class DetectorScorer:
    """An open-vocabulary detector answering GenEval's presence, count and position questions."""

    name = "detector"

    def __init__(self, model: str, device: str | None = None, threshold: float = 0.2) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from shards.hub import load_pretrained

        self.model_name, self.threshold = model, threshold
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, model, "detector", "--detector")
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(AutoProcessor.from_pretrained, model, "detector", "--detector")

    def detect(self, image, classes: Sequence[str]) -> dict[str, list[tuple[float, list[float]]]]:
        """class -> [(confidence, box)] above the threshold, most confident first, overlaps merged."""
        import torch

        queries = [f"a photo of a {c}" for c in classes]
        inputs = self.processor(text=[queries], images=[image], padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        post = self.processor.post_process_grounded_object_detection
        kwargs = {"input_ids": inputs["input_ids"]} if "input_ids" in inspect.signature(post).parameters else {}
        res = post(outputs, threshold=self.threshold, target_sizes=[image.size[::-1]], text_labels=[list(classes)], **kwargs)[0]
        found: dict[str, list[tuple[float, list[float]]]] = {}
        for score, box, label in sorted(zip(res["scores"].tolist(), res["boxes"].tolist(), res["text_labels"]), key=lambda x: -x[0]):
            cls = class_of(label, classes)
            if cls is None:
                continue
            same = found.setdefault(cls, [])
            if all(iou(box, b) <= NMS_IOU for _, b in same):
                same.append((score, box))
        return found

    def score_records(self, images: Sequence, records: Sequence[dict[str, Any]]) -> list:
        """A Verdict per record (its `detect`: {"meta": the GenEval metadata, "index": the question's})."""
        from evals.vqa import Verdict

        memo: dict[str, list] = {}
        verdicts = []
        for image, rec in zip(images, records):
            meta = rec["detect"]["meta"]
            if rec["image"] not in memo:
                memo[rec["image"]] = geneval_answers(meta, self.detect(image, sorted({e["class"] for e in meta["include"]})))
            yes, score = memo[rec["image"]][rec["detect"]["index"]] or (False, 0.0)
            verdicts.append(Verdict(p_yes=float(score), p_no=1.0 - float(score), answer="yes" if yes else "no"))
        return verdicts
