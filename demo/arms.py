"""The demo's four arms: PixArt-alpha's three decisions, each measured against its absence.

| arm | init                         | captions     | aesthetic fine-tune |
|-----|------------------------------|--------------|---------------------|
| a   | scratch                      | alt-texts    | no                  |
| b   | scratch                      | VLM captions | no                  |
| c   | class-cond DiT (import-dit)  | VLM captions | no                  |
| d   | c's last checkpoint          | VLM captions | yes (score/select)  |

a, b and c train the same number of steps with the same seed, batch and schedule; every
`curve_every` steps a checkpoint is kept and judged on the same held-out prompts (combinations
never trained), which gives the accuracy-against-steps curves. Judgements are cached per
checkpoint (`<arm>/judged/step-*.json`), so a rerun judges only what is new.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ARMS: dict[str, str] = {
    "a": "scratch + alt-texts",
    "b": "scratch + VLM captions",
    "c": "DiT import + VLM captions",
    "d": "(c) + aesthetic fine-tune",
}
ATTRS = ("color", "shape", "position", "all")


@dataclass
class ArmSettings:
    """What every arm shares (equal compute, same seed)."""

    base: Any  # TrainConfig with the manifest's defaults, resolution, models and seed applied
    steps: int
    curve_every: int
    sampler_steps: int
    guidance: float
    progress: bool
    dit_classes: str  # the class-cond DiT's label column: "shape" or "layout" (shape x position)
    dit_lr: float = 0.0  # the class-cond DiT stage's learning rate (0: the arms')


def write_arm_shards(captions_dir: Path, records: dict, out_dir: Path, text: str) -> int:
    """The train split as caption shards whose `caption` is the VLM caption (`text="vlm"`) or the
    image's alt-text (`text="alt"`), with the class-cond stage's label columns: `shape`, and
    `layout` ("<shape> <position>", e.g. "circle left"), and `caption_truth`: the world's dense
    caption of the scene (what a perfect captioner writes). Held-out combinations are left out.
    Written once; a complete set with this schema is reused (one written before a column was
    added is rewritten)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import ShardWriter, clean_incomplete, complete_shards, iter_batches
    from shards.schema import CAPTION_SCHEMA
    from tiny import world as W

    schema = CAPTION_SCHEMA
    for column in ("shape", "layout", "caption_truth"):
        schema = schema.append(pa.field(column, pa.string()))
    done = complete_shards(out_dir)
    if done and (out_dir / "manifest.json").exists() and pq.read_schema(str(done[0])).names == schema.names:
        return json.loads((out_dir / "manifest.json").read_text())["rows"]
    clean_incomplete(out_dir)
    for p in out_dir.glob("*.parquet*"):
        p.unlink()
    w = ShardWriter(out_dir, rows_per_shard=5000, writer_id="00000000", schema=schema)
    for batch in iter_batches(captions_dir):
        for row in batch.to_pylist():
            rec = records.get(row["key"])
            if not rec or rec[0]["split"] != "train" or row["error"] is not None:
                continue
            if text == "alt":
                row["caption"] = rec[0]["alt_text"]
            scene = rec[1]
            w.add({**row, "shape": scene.shape, "layout": prior_label(scene, "layout"), "caption_truth": W.dense_caption(scene)})
    return w.close()["rows"]


# settings that change how a stage runs or reports, not what it learns: a finished stage trained
# with other values of these is still the stage asked for
RUN_ONLY = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "val_every", "threads", "loader_workers",
            "report_to", "sample_prompts", "trace_keys")
MODEL_FIELDS = ("vae", "text_encoder", "teacher")  # paths compared by contents


def train_stage(cfg, out: Path, shards: Path, features: Path, progress: bool) -> dict[str, Any]:
    """One training stage into `out` (resumed when it has checkpoints, skipped when finished with
    the same settings; finished with others, refused in one line)."""
    from t2i.checkpoint import latest_checkpoint
    from t2i.recovery import checkpoint_step, has_checkpoints
    from t2i.stage import run_stage

    ck = latest_checkpoint(out) if has_checkpoints(out) else None
    done = checkpoint_step(ck)
    if done is not None and done >= cfg.steps:
        check_same_settings(cfg, out, ck)
        return {"skipped": "finished", "step": done}
    return run_stage(cfg, out, shards=shards, features=features, resume=done is not None, progress=progress)


def check_same_settings(cfg, out: Path, ck: Path) -> None:
    """A UserError when finished stage `out` (its checkpoint `ck`) was trained with other settings
    than `cfg`: a rerun into the same --out with other flags would report the old stage's samples
    as the new settings' (settings its checkpoint does not record, from an older version, pass)."""
    from shards.errors import UserError
    from t2i.checkpoint import TRAINER_STATE
    from t2i.train.loop import recorded_config

    theirs = json.loads((ck / TRAINER_STATE).read_text()).get("config", {})
    ours = json.loads(json.dumps(recorded_config(cfg), default=str))  # as the checkpoint wrote it
    differ = [f"{k} {theirs[k]!r} (now {ours[k]!r})" for k in ours
              if k in theirs and k not in RUN_ONLY and theirs[k] != ours[k] and not same_model(k, theirs[k], ours[k])]
    if differ:
        raise UserError(f"{out} holds a finished stage trained with other settings: {', '.join(differ)}: "
                        "pass another --out, or delete that directory to train it again")


def same_model(field: str, theirs: Any, ours: Any) -> bool:
    """Two paths of `field` name the same model: local folders with the same contents (the shipped
    VAE of another clone of the repository, say)."""
    from shards.hub import local_model_digest

    if field not in MODEL_FIELDS or not (theirs and ours and Path(theirs).is_dir() and Path(ours).is_dir()):
        return False
    return local_model_digest(theirs) == local_model_digest(ours)


def checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every kept checkpoint of a stage, oldest first."""
    from t2i.checkpoint import checkpoint_dirs, parse_step

    return sorted((parse_step(p.name), p) for p in checkpoint_dirs(stage_dir))


def judge_checkpoint(ck: Path, scenes: list, prompts: list[str], cache: Path, steps: int, guidance: float,
                     seed: int) -> tuple[dict[str, Any], list]:
    """Sample `prompts` from checkpoint `ck` and judge the images against `scenes`. Returns
    (score, images); the score is cached in `cache` (images are only needed for the final step,
    which the caller re-samples when its cache exists)."""
    from shards.fs import write_text
    from t2i.sample import generate, pipeline_from_checkpoint
    from tiny import judge

    pipe, null = pipeline_from_checkpoint(ck)
    images = generate(pipe, null, prompts, steps=steps, guidance=guidance, seed=seed)
    score = judge.score(list(zip(scenes, images)), attributes=("color", "position", "shape"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, json.dumps(score))
    return score, images


def curve(stage_dir: Path, scenes: list, prompts: list[str], s: ArmSettings, seed: int,
          step_offset: int = 0) -> tuple[list[dict[str, Any]], list]:
    """Judge every kept checkpoint of `stage_dir` (cached ones are read back). Returns the curve
    points [{"step", color, shape, position, all}] and the final checkpoint's images."""
    points, final_images = [], []
    cks = checkpoints(stage_dir)
    for i, (step, ck) in enumerate(cks):
        cache = stage_dir / "judged" / f"{ck.name}.json"
        last = i == len(cks) - 1
        if cache.exists() and not last:
            score = json.loads(cache.read_text())
        else:
            score, images = judge_checkpoint(ck, scenes, prompts, cache, s.sampler_steps, s.guidance, seed)
            if last:
                final_images = images
        points.append({"step": step + step_offset, **{a: score[a]["accuracy"] for a in ATTRS}, "n": score["n"]})
    return points, final_images


def prior_label(scene, dit_classes: str) -> str:
    """The class-cond DiT's label of a scene: its shape, or "<shape> <position>" for "layout"."""
    return scene.shape if dit_classes == "shape" else f"{scene.shape} {scene.position}"


def judge_prior(dit_dir: Path, scenes: list, s: ArmSettings, seed: int) -> tuple[dict[str, Any], list]:
    """What the pixel prior knows before any text: the class-cond DiT's last checkpoint, asked for
    each held-out scene's label, judged on shape (and position, when its labels carry it). Scenes
    whose label the DiT never trained on are left out. Returns (score, images); the score is cached."""
    from shards.fs import write_text
    from t2i.class_cond import CLASSES_JSON, generate_classes
    from tiny import judge

    step, ck = checkpoints(dit_dir)[-1]
    known = set(map(str, json.loads((ck / CLASSES_JSON).read_text())["classes"]))
    asked = [sc for sc in scenes if prior_label(sc, s.dit_classes) in known]
    labels = [prior_label(sc, s.dit_classes) for sc in asked]
    attrs = ("shape",) if s.dit_classes == "shape" else ("shape", "position")
    cache = dit_dir / "judged" / f"prior-{ck.name}.json"
    images = generate_classes(ck, labels, steps=s.sampler_steps, guidance=s.guidance, seed=seed)
    if cache.exists():
        return json.loads(cache.read_text()), images
    judged = judge.score(list(zip(asked, images)), attributes=attrs)
    score = {"step": step, "classes": s.dit_classes, "labels": labels, "n": judged["n"],
             **{a: judged[a]["accuracy"] for a in attrs}, "chance": {a: judged[a]["chance"] for a in attrs}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text(cache, json.dumps(score))
    return score, images


def steps_to_reach(points: list[dict[str, Any]], target: float, attr: str = "all") -> int | None:
    """The first judged step whose `attr` accuracy (default: all three right) is at least
    `target` (None: never)."""
    return next((p["step"] for p in points if p[attr] >= target), None)


def reach_by_attribute(arms: dict[str, Any]) -> dict[str, int | None]:
    """For each attribute, the first step at which (c) matched (b)'s final accuracy on it."""
    return {a: steps_to_reach(arms["c"]["curve"], arms["b"]["final"][a], a) for a in ATTRS}


def arm_config(s: ArmSettings, name: str, init: str, steps: int, **extra):
    """The shared TrainConfig with this arm's name, init and length; checkpoints every
    `curve_every` steps, all kept (they are the curve)."""
    from dataclasses import replace

    return replace(s.base, name=name, init=init, steps=steps, checkpoint_every=s.curve_every,
                   keep_checkpoints=steps // max(s.curve_every, 1) + 2, **extra)


def dit_config(s: ArmSettings, steps: int, **extra):
    """Arm (c)'s first stage: the class-conditional DiT on `s.dit_classes`, at its own lr when set."""
    lr = {"lr": s.dit_lr} if s.dit_lr else {}
    return arm_config(s, "dit", "scratch", steps, kind="class-cond", class_column=s.dit_classes, **lr, **extra)


def run_arms(s: ArmSettings, out: Path, shards: dict[str, Path], dit_steps: int, scenes: list, prompts: list[str],
             seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train arms a, b, c (and c's class-cond DiT first, whose own samples are judged too) and judge
    their curves."""
    import time

    runs, timing = {}, {}
    feats = {"alt": out / "features_alt", "vlm": out / "features_vlm"}
    t0 = time.perf_counter()
    dit_dir = out / "dit"
    train_stage(dit_config(s, dit_steps), dit_dir, shards["vlm"], feats["vlm"], s.progress)
    timing["dit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior, prior_images = judge_prior(dit_dir, scenes, s, seed)
    timing["judge_dit_s"] = time.perf_counter() - t0
    plan = {"a": ("alt", "scratch"), "b": ("vlm", "scratch"), "c": ("vlm", f"dit:{dit_dir}")}
    for arm, (text, init) in plan.items():
        log(f"      arm ({arm}) {ARMS[arm]}: {s.steps} steps")
        t0 = time.perf_counter()
        train_stage(arm_config(s, f"arm-{arm}", init, s.steps), out / f"arm-{arm}", shards[text], feats[text], s.progress)
        timing[f"train_{arm}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        points, images = curve(out / f"arm-{arm}", scenes, prompts, s, seed)
        timing[f"judge_{arm}_s"] = time.perf_counter() - t0
        runs[arm] = {"label": ARMS[arm], "curve": points, "final": points[-1] if points else None, "images": images}
    return {"arms": runs, "timing": timing, "prior": prior, "prior_images": prior_images}


def arm_claims(arms: dict[str, Any], steps: int) -> dict[str, Any]:
    """The figures behind the report's claims: (b) over (a) on all three, when (c) reached (b)'s
    final all-three accuracy, and what the aesthetic fine-tune (d) did to it."""
    b_final = arms["b"]["final"]["all"]
    reach = steps_to_reach(arms["c"]["curve"], b_final)
    return {
        "captions_ratio": b_final / max(arms["a"]["final"]["all"], 1e-9) if arms["a"]["final"]["all"] else None,
        "b_final_all": b_final, "a_final_all": arms["a"]["final"]["all"],
        "c_steps_to_b_final": reach, "c_steps_fraction": (reach / steps) if reach is not None else None,
        "d_all_change": arms["d"]["final"]["all"] - arms["c"]["final"]["all"],
    }
