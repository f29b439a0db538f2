"""Stage 3 in miniature: pick a better-looking subset with `score` + `select`, fine-tune on it,
and measure the samples' aesthetic score before and after.

The world has a quality axis with ground truth (`tiny.world.degrade`: blurred, grainy, heavy
JPEG). A tiny CLIP is fitted on the world (`tiny.clip`), an aesthetic head is fitted on
a small rated sample through `score --fit-aesthetic` (ratings from the ground truth, as a user
would rate a few hundred images), every training image is scored (`run_score`) and
`run_select` keeps the rows the head rates well. The same head then scores generated samples:
its ground truth is how it rates real clean and real degraded held-out images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

HIGH, LOW = 7.5, 2.5  # ratings given to clean and degraded images of the rated sample
WHERE = "aesthetic >= 5.0"


def select_subset(out: Path, shards: Path, records: dict, seed: int, rated: int, clip_steps: int,
                  progress: bool) -> dict[str, Any]:
    """Tiny CLIP + rated sample -> `score` -> `select`; returns what it selected and how well."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.api import ScoreConfig, run_score
    from curate.select import run_select
    from tiny.clip import train_world_clip
    from shards import iter_batches

    clip_dir = out / "clip"
    if not (clip_dir / "config.json").exists():
        train_world_clip(clip_dir, n=600, seed=seed, steps=clip_steps)
    keys = [r["key"] for b in iter_batches(shards, columns=["key"]) for r in b.to_pylist()]
    quality = {k: records[k][1].quality for k in keys}
    ratings = out / "ratings.parquet"
    if not ratings.exists():
        sample = keys[:rated]  # a user rates a few hundred images
        pq.write_table(pa.table({"key": sample, "rating": [HIGH if quality[k] == "high" else LOW for k in sample]}), ratings)
    scores = out / "scores"
    run_score(ScoreConfig(shards=str(shards), out=str(scores), scorers="clip,aesthetic", clip_model=str(clip_dir),
                          fit_aesthetic=str(ratings), batch_size=64, progress=progress))
    selected = out / "selected"
    summary = run_select(shards, scores, WHERE, selected)
    chosen = [r["key"] for b in iter_batches(selected, columns=["key"]) for r in b.to_pylist()]
    clean = sum(quality[k] == "high" for k in chosen)
    return {"clip": str(clip_dir), "head": str(scores / "aesthetic-head.safetensors"), "where": WHERE,
            "rated": min(rated, len(keys)), "rows": len(keys), "selected": len(chosen),
            "precision": clean / max(len(chosen), 1),
            "recall": clean / max(sum(q == "high" for q in quality.values()), 1),
            "low_in_training": sum(q == "low" for q in quality.values()) / max(len(keys), 1),
            "removed": summary.removed, "shards": str(selected)}


class AestheticJudge:
    """The fitted head on the tiny CLIP's image embeddings: a score per image (LAION's scale)."""

    def __init__(self, clip_dir: str, head_path: str) -> None:
        from shards.models.aesthetic import load_head
        from shards.models.clip import ClipEmbedder

        self.clip = ClipEmbedder(clip_dir)
        self.head = load_head(head_path, self.clip.dim)

    def __call__(self, images: list) -> list[float]:
        return [float(x) for x in self.head.predict(self.clip.embed_images(images))] if images else []


def ground_truth(judge: AestheticJudge, records: dict, resolution: int, world_root: Path) -> dict[str, float]:
    """How the judge rates real held-out images, clean and degraded, at the samples' resolution."""
    from PIL import Image

    clean, low = [], []
    for key, (rec, scene) in records.items():
        if rec["split"] != "heldout":
            continue
        img = Image.open(world_root / key).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        (clean if scene.quality == "high" else low).append(img)
    a, b = judge(clean), judge(low)
    return {"clean_mean": sum(a) / max(len(a), 1), "degraded_mean": sum(b) / max(len(b), 1), "clean_n": len(a), "degraded_n": len(b)}


def compare(judge: AestheticJudge, before: list, after: list, threshold: float) -> dict[str, Any]:
    """Mean score and share rated below the selection threshold, before and after, with the
    standard error of the difference of means (paired: the same prompts and noise)."""
    import numpy as np

    a, b = np.array(judge(before)), np.array(judge(after))
    diff = b - a
    return {"before_mean": float(a.mean()), "after_mean": float(b.mean()), "margin": float(diff.mean()),
            "margin_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan"),
            "before_low_share": float((a < threshold).mean()), "after_low_share": float((b < threshold).mean()),
            "n": int(len(a))}


def run_finetune(s, out: Path, subset: dict[str, Any], arm_c: Path, steps: int, scenes: list, prompts: list[str],
                 seed: int, log: Callable[[str], None], lr: float) -> dict[str, Any]:
    """Arm (d): fine-tune arm (c)'s last checkpoint on the selected subset at `lr`; its curve
    continues (c)'s step count."""
    from demo.arms import arm_config, checkpoints, curve, train_stage

    log(f"      arm (d) fine-tune on {subset['selected']} selected images: {steps} steps")
    cfg = arm_config(s, "arm-d", f"checkpoint:{arm_c}", steps, lr=lr)
    cfg.checkpoint_every = max(steps // 2, 1)
    train_stage(cfg, out / "arm-d", Path(subset["shards"]), out / "features_selected", s.progress)
    c_steps = checkpoints(arm_c)[-1][0]
    points, images = curve(out / "arm-d", scenes, prompts, s, seed, step_offset=c_steps)
    return {"curve": points, "final": points[-1], "images": images}
