"""The levers' ablation (issue 29's proof): the demo's arm (c), PixArt-alpha's recipe (the
class-conditional DiT imported, then VLM captions), alone and with each cost lever, every arm on
the same world, captions, seed, batch, schedule, held-out prompts and judged checkpoints.

| arm        | what changes against (c)                                                         |
|------------|----------------------------------------------------------------------------------|
| c          | nothing: PixArt-alpha's recipe, DDPM (the demo's v-prediction), whatever the     |
|            | demo's own objective                                                             |
| flow       | rectified flow, logit-normal timesteps (SD3 / Sana); its DiT stage trains with   |
|            | flow too (no weight conversion maps a DDPM model onto a flow one)                |
| repa       | REPA, lambda 0.5, block round(depth / 3), with the demo's teacher (demo.teacher) |
| token_drop | half the patch tokens routed past block 1 of the demo's 2 (t2i.routing)          |
| min_snr    | min-SNR-5 loss weighting of the DDPM loss                                        |
| best       | (c) with every lever whose arm ended above (c)'s final all-three on this seed    |
|            | (at least the single best; flow and min_snr exclude each other: min-SNR weights  |
|            | the DDPM loss, so the better of the two is kept)                                 |

Each arm's cost is priced as `plan` prices it (costs.plan: t2i.models.flops_per_image with the
arm's token routing and REPA projector, x batch x steps, plus its DiT stage and, with REPA, the
teacher's forward once per training image in features), at the demo's own latent size.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from demo.teacher import SHIPPED_TEACHER

LEVERS: dict[str, dict[str, Any]] = {
    "flow": {"objective": "flow", "timestep_density": "logit_normal"},
    "repa": {"teacher": str(SHIPPED_TEACHER), "repa_weight": 0.5},
    "token_drop": {"token_drop": 0.5, "token_drop_start": 0, "token_drop_end": 1},  # the demo's 2 blocks: the first routed
    "min_snr": {"loss_weighting": "min_snr"},
}
EXCLUSIVE = ("flow", "min_snr")  # min-SNR weights the DDPM loss: a flow arm cannot take it


def lever_settings(names: list[str]) -> dict[str, Any]:
    """The TrainConfig settings of levers `names` together; flow resets the DDPM-only settings
    (the demo's v-prediction, timestep power) to their defaults, which flow refuses otherwise."""
    from t2i.objective import OBJECTIVES

    out: dict[str, Any] = {}
    for name in names:
        out.update(LEVERS[name])
    if out.get("objective") == "flow":
        out.update({k: v for k, v in OBJECTIVES["ddpm"].OWN.items() if k not in out})
    return out


def objective_only(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of an arm's settings its DiT stage takes: a flow arm's objective (an init must be
    of the same kind); a loss weighting, REPA and routing change the text-to-image stage only."""
    from t2i.objective import OBJECTIVE_FIELDS

    if settings.get("objective") != "flow":
        return {}
    return {k: v for k, v in settings.items() if k in OBJECTIVE_FIELDS and k != "loss_weighting"}


def best_combination(finals: dict[str, dict[str, float]]) -> list[str]:
    """The levers for the combined arm from each arm's final scores on this seed: those that
    ended above (c) on all three (ties broken by shape), at least the best one; of flow and
    min_snr only the better."""
    key = {name: (f["all"], f["shape"]) for name, f in finals.items()}
    ranked = sorted((n for n in key if n in LEVERS), key=lambda n: key[n], reverse=True)
    chosen = [n for n in ranked if key[n] > key["c"]] or ranked[:1]
    both = [n for n in chosen if n in EXCLUSIVE]
    return [n for n in chosen if n not in both[1:]]


def truth_captions(records: dict, world: Path, out: Path) -> None:
    """Caption shards (the caption job's schema) whose captions are the world's dense ground truth
    (tiny.world.dense_caption: what a perfect captioner writes), in place of the tiny LLaVA's."""
    from shards import ShardWriter, complete_shards
    from shards.schema import CaptionRow
    from tiny import world as W

    if complete_shards(out):
        return
    w = ShardWriter(out, rows_per_shard=5000, writer_id="00000000")
    for key, (r, scene) in records.items():
        path = str((world / key).resolve())
        w.add(CaptionRow(key=key, source=path, address=path, width=r.get("width"), height=r.get("height"),
                         alt_text=r["alt_text"], caption=W.dense_caption(scene), model="ground truth"))
    w.close()


def prepare(cfg, out: Path, log: Callable[[str], None], progress: bool, captions: str = "vlm") -> dict[str, Any]:
    """The demo's stages 1-3 (world, captioner, captions: reused when done; `captions="truth"`:
    the ground-truth dense captions, no captioner) and what every arm shares: the caption shards,
    the tiny T5, the arm settings, the held-out prompts."""
    from demo.arms import write_arm_shards
    from demo.run import _arm_settings, _build_world, _caption_world, _train_captioner
    from tiny import world as W
    from tiny.pixart import build_tiny_text_encoder

    log(f"      world and captions ({captions})")
    sam, truth, records = _build_world(cfg, out)
    if captions == "truth":
        truth_captions(records, out / "world", out / "captions")
    else:
        cap_dir, _ = _train_captioner(cfg, out, truth, log, progress)
        _caption_world(cfg, sam, cap_dir, out / "captions", records, progress)
    shards = out / "t2i_shards_vlm"
    write_arm_shards(out / "captions", records, shards, "vlm")
    corpus = [W.dense_caption(s) for s in W.sample_scenes(400, cfg.seed + 99, "any")]
    corpus += [W.dense_caption(s) for _, s in records.values()] + [r["alt_text"] for r, _ in records.values()]
    tiny = out / "tiny_models"
    if not (tiny / "t5" / "text_encoder").exists():
        build_tiny_text_encoder(tiny / "t5", corpus)
    scenes = W.sample_scenes(cfg.curve_prompts, cfg.seed + 2024, "heldout")
    return {"settings": _arm_settings(cfg, tiny / "t5", progress), "shards": shards, "scenes": scenes,
            "prompts": [W.dense_caption(sc) for sc in scenes], "train_images": cfg.world_train}


def run_arm(p: dict[str, Any], out: Path, name: str, levers: list[str], dit_steps: int, seed: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Train arm `name` ((c) with `levers`) after its DiT stage (shared by arms of one objective)
    and judge its curve; returns its curve, final scores, levers and plan-priced FLOPs."""
    from demo.arms import arm_config, curve, dit_config, train_stage

    s, settings = p["settings"], lever_settings(levers)
    obj = objective_only(settings)
    dit_dir = out / ("dit" if not obj else "dit-" + "-".join(f"{k}={v}" for k, v in sorted(obj.items())))
    train_stage(dit_config(s, dit_steps, **obj), dit_dir, p["shards"], out / "features", s.progress)
    log(f"      arm {name}: (c) + {' + '.join(levers) or 'nothing'}, {s.steps} steps")
    arm_dir = out / arm_dir_name(name, levers)
    arm_cfg = arm_config(s, arm_dir.name, f"dit:{dit_dir}", s.steps, **settings)
    train_stage(arm_cfg, arm_dir, p["shards"], out / "features", s.progress)
    points, _ = curve(arm_dir, p["scenes"], p["prompts"], s, seed)
    return {"levers": levers, "settings": settings, "curve": points, "final": points[-1],
            **training_time(arm_dir), "flops": arm_flops(arm_cfg, dit_cfg, p["train_images"])}


def arm_dir_name(name: str, levers: list[str]) -> str:
    """An arm's stage directory. The best combination's names its levers: a rerun whose new arms
    change the choice must train the new combination, not resume (or reuse) the old one's stage."""
    return f"arm-{name}" if name != "best" else "arm-best-" + "+".join(sorted(levers))


def training_time(stage_dir: Path) -> dict[str, Any]:
    """{"train_s": the wall seconds of every training run of a stage, "trained_at": when its first
    began}, from its ledger: a finished arm that a rerun reuses keeps the time it took (measured
    under its own run's load), and a resumed one counts each of its runs."""
    from costs.cost import ledger_records
    from shards.ledger import LEDGER

    runs = [r for r in ledger_records(stage_dir / LEDGER) if r.get("job") == "train"]
    return {"train_s": sum(r.get("wall_s", 0.0) for r in runs), "trained_at": min((r.get("started", "") for r in runs), default="")}


def arm_flops(cfg, dit_cfg, train_images: int) -> dict[str, float]:
    """The arm's training FLOPs as `plan` prices them (t2i.models.flops_per_image with its routing
    and REPA projector, x batch x steps), its DiT stage's, and its teacher's forward in features."""
    from costs.plan import repa_macs, routed_of, teacher_cost
    from t2i.encoders import vae_factors
    from t2i.models import flops_per_image

    latent = cfg.resolution // vae_factors(cfg.vae).spatial
    channels = json.loads((Path(cfg.text_encoder) / "text_encoder" / "config.json").read_text())["d_model"]

    def stage(c, cross: bool) -> float:
        routed, _ = routed_of(c)
        per = flops_per_image(c.preset, (latent, latent), c.max_tokens, channels, cross_attention=cross,
                              token_drop=c.token_drop, routed_blocks=routed, token_macs=repa_macs(c))
        return per * c.steps * c.batch_size * c.grad_accum

    teacher, _, _ = teacher_cost(cfg)
    parts = {"train": stage(cfg, True), "dit": stage(dit_cfg, False), "teacher": teacher * train_images}
    return {**parts, "total": sum(parts.values())}


def run_ablation(cfg, out: Path, log: Callable[[str], None] = print, progress: bool = False,
                 levers: tuple[str, ...] = tuple(LEVERS), captions: str = "vlm", batch_size: int = 0) -> dict[str, Any]:
    """Arm (c), (c) + each of `levers`, and (c) + the best combination of them, for one seed,
    into `out` (every stage resumes or is reused); writes and returns `out/ablation.json`. Arm (c)
    is PixArt-alpha's recipe, DDPM, whatever objective `cfg` names: flow is a lever."""
    import time

    import torch

    from demo.run import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = replace(cfg, objective="ddpm")
    p = prepare(cfg, out, log, progress, captions)
    if batch_size:  # the arms' and DiT's batch (default: the demo's manifest's)
        p["settings"].base.batch_size = batch_size
    arms = {"c": run_arm(p, out / "t2i", "c", [], cfg.dit_steps, cfg.seed, log)}
    for name in levers:
        arms[name] = run_arm(p, out / "t2i", name, [name], cfg.dit_steps, cfg.seed, log)
    best = best_combination({k: v["final"] for k, v in arms.items()})
    if len(best) > 1:  # a single lever's combination is its own arm
        arms["best"] = run_arm(p, out / "t2i", "best", best, cfg.dit_steps, cfg.seed, log)
    result = {"seed": cfg.seed, "config": dict(vars(cfg)), "captions": captions, "batch_size": p["settings"].base.batch_size,
              "best": best, "arms": arms,
              "prompts": len(p["prompts"]), "wall_s": time.perf_counter() - t0}
    (out / "ablation.json").write_text(json.dumps(result, indent=1, default=str))
    return result
