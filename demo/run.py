"""`t2i-data demo`: the whole PixArt-alpha recipe on a miniature world, on one CPU, in minutes.

1. build the world (SA-1B-style folder of coloured shapes, with LAION-like alt-texts);
2. train the project's own tiny LLaVA captioner on part of it;
3. `caption` the world into shards with that captioner (the real caption job);
4. `stats` the VLM captions against the alt-texts (the real stats job);
5. `train` a tiny PixArt on the VLM captions (tiny manifest), then sample prompts, held-out
   colour/shape/position combinations included, and judge the images automatically;
6. write report.html + report.md.

Deterministic for a seed. Every figure in the report is measured here.
"""

from __future__ import annotations

import json
import platform
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from demo.judge_vlm import SHIPPED_JUDGE
from demo.vae import SHIPPED_VAE
from shards.checks import SEED, check_output_dir
from shards.errors import UserError
from t2i.feature_config import TEXT_DTYPES

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@dataclass
class DemoConfig:
    """Sizes of the miniature world and of each stage. `quick()` is the test-suite version."""

    out: str = "demo_out"
    seed: int = 0
    world_train: int = 1200  # images whose (colour, shape, position) may be seen in training
    world_heldout: int = 150  # images of combinations never seen in any training
    image_size: int = 64  # the world's "photos"
    low_quality: float = 0.3  # share of degraded photos (blur, grain, heavy JPEG): the aesthetic axis
    captioner_steps: int = 1200
    caption_backend: str = "transformers"
    t2i_manifest: str = str(MANIFESTS / "tiny-cpu.toml")
    t2i_resolution: int = 32
    preset: str = "PixArt-tiny/2"  # patch 2 on the VAE's 16x16 latents: 64 tokens
    # DDPM, not flow: at this scale flow slowed (c)'s head start (position 85% / 100% on seeds 0 / 1
    # against DDPM's 100%) and learned no shape either (README, "Ablation"); it wins at --full's scale
    objective: str = "ddpm"  # ddpm | flow (rectified flow: every arm and the DiT stage)
    timestep_density: str = "logit_normal"  # "flow" only: its training timesteps (TrainConfig.timestep_density)
    prediction_type: str = "v_prediction"  # "ddpm" only: v, not epsilon (single-coloured objects, no stray blobs)
    timestep_power: float = 1.0  # "ddpm" only: uniform training timesteps (TrainConfig.timestep_power)
    max_tokens: int = 0  # caption tokens the T5 keeps (0: the manifest's 16, which cuts the ~28-token dense captions)
    text_dtype: str = ""  # how the arms store T5 ("": the manifest's float32; int8 | fp8: t2i.text_codec; ids: t2i.text_ondemand)
    lr: float = 3e-3  # with epsilon (2026-11-26), colour/position 35/27% at step 400 against 10/12% at 1e-3
    vae: str = str(SHIPPED_VAE)  # frozen, fitted offline by `python -m demo.vae` (as PixArt uses SD's VAE)
    dit_steps: int = 400  # stage 1: the class-conditional DiT
    dit_classes: str = "shape"  # its labels: "shape", or "layout" (shape x position: it learns where to draw, then what)
    dit_lr: float = 0.0  # its learning rate (0: the arms' lr)
    arm_steps: int = 800  # arms a, b, c each (equal compute, same seed); 1000 took the demo to 614-631 s (quiet)
    finetune_steps: int = 200  # arm d: stage 3 on the selected subset
    finetune_lr: float = 0.0  # arm d's learning rate (0: the arms' lr)
    curve_points: int = 5  # checkpoints judged per arm
    curve_prompts: int = 48  # held-out prompts judged per checkpoint
    judge: str = str(SHIPPED_JUDGE)  # the eval stage's VLM judge (`python -m demo.judge_vlm`); "": no eval stage
    eval_prompts: int = 6  # the eval stage's own-captions suite: combinations per split, each in 4 wordings
    eval_min_count: int = 3  # captions a combination needs to count as seen
    eval_captions: str = "caption"  # the arm shards' field the suite is drawn from: the VLM captions ("caption_truth": the world's)
    sampler_steps: int = 14  # DPM-Solver++ steps per sample
    rated: int = 300  # images "rated" by hand (ground truth) to fit the aesthetic head
    clip_steps: int = 300  # the tiny CLIP's contrastive fit
    examples: int = 12  # images shown with alt-text and caption
    threads: int = 2

    @classmethod
    def quick(cls, out: str, seed: int = 0) -> "DemoConfig":
        return cls(out=out, seed=seed, world_train=160, world_heldout=24, captioner_steps=60, dit_steps=10,
                   arm_steps=20, finetune_steps=10, curve_points=2, curve_prompts=8, sampler_steps=6, rated=80,
                   clip_steps=30, examples=4, eval_prompts=1, eval_min_count=1, eval_captions="caption_truth")

    @classmethod
    def mid(cls, out: str, seed: int = 0) -> "DemoConfig":
        """A middle tier for arm (c) to draw shapes: PixArt-mini/2 (~1.2M), flow matching, its DiT
        stage on the layout labels at a high lr (its prior drew 69% / 75% of shapes at step 800 on
        seeds 0 / 1, where the default's tiny one stays near 25%). ~35 min on 2 cores beside other work."""
        return cls(out=out, seed=seed, preset="PixArt-mini/2", objective="flow", max_tokens=32, dit_steps=800,
                   dit_classes="layout", dit_lr=6e-3, lr=3e-3, arm_steps=800, finetune_steps=200)

    @classmethod
    def full(cls, out: str, seed: int = 0) -> "DemoConfig":
        """The longer run whose curves go to BENCHMARKS.md: a 2x wider and 2x deeper model
        (PixArt-mini/2, ~1.2M) trained long enough to draw shapes, not only colour and position."""
        return cls(out=out, seed=seed, preset="PixArt-mini/2", lr=1e-3, timestep_power=0.6, max_tokens=32, dit_steps=5000,
                   dit_classes="layout",
                   arm_steps=2400, finetune_steps=800, finetune_lr=3e-3, curve_points=12, curve_prompts=96)

    @classmethod
    def for_mode(cls, mode: str, out: str, seed: int = 0) -> "DemoConfig":
        """The configuration of a named run: "default", "quick" (the tests'), "mid" or "full"."""
        return {"quick": cls.quick, "mid": cls.mid, "full": cls.full}.get(mode, cls)(out=out, seed=seed)


@dataclass
class DemoOptions:
    """The demo command's flags (they map 1:1): where, the seed, the captioning backend, and which
    named DemoConfig runs (default, --quick, --mid or --full)."""

    out: str = DemoConfig.out
    seed: int = DemoConfig.seed
    backend: str = DemoConfig.caption_backend
    quick: bool = False
    mid: bool = False
    full: bool = False
    text_dtype: str = DemoConfig.text_dtype
    progress: bool = True

    def validate(self) -> None:
        """A UserError for an unknown backend, both modes at once, a seed out of range or an
        --out that cannot be written (before any work)."""
        if self.backend not in ("transformers", "vllm"):
            raise UserError(f"unknown --backend {self.backend!r}: use transformers or vllm")
        if sum((self.quick, self.mid, self.full)) > 1:
            raise UserError("--quick, --mid and --full contradict each other: pass one of them")
        SEED.check("seed", self.seed)
        if self.text_dtype and self.text_dtype not in TEXT_DTYPES:
            raise UserError(f"--text-dtype {self.text_dtype!r} is not one of {', '.join(TEXT_DTYPES)}: pick one")
        check_output_dir(self.out)

    def config(self) -> DemoConfig:
        """The named configuration these options pick, captioned with their backend."""
        self.validate()
        mode = "quick" if self.quick else "mid" if self.mid else "full" if self.full else "default"
        cfg = DemoConfig.for_mode(mode, str(self.out), self.seed)
        cfg.caption_backend, cfg.text_dtype = self.backend, self.text_dtype
        return cfg


def demo_command(options: DemoOptions, log: Callable[[str], None] = print) -> None:
    """`t2i-data demo`: the whole recipe into `options.out`, its stages told to `log`."""
    run_demo(options.config(), log=log, progress=options.progress)


def _stage(log: Callable[[str], None], n: int, title: str) -> float:
    log(f"[{n}/7] {title}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every stage into `cfg.out`; returns the measured results (also in results.json)."""
    import torch

    _quiet_libraries()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t_start = time.perf_counter()

    t0 = _stage(log, 1, "building the world")
    sam, truth, records = _build_world(cfg, out)
    timing["world_s"] = time.perf_counter() - t0

    t0 = _stage(log, 2, "training the captioner (a tiny LLaVA)")
    cap_dir, cap_train = _train_captioner(cfg, out, truth, log, progress)
    timing["captioner_s"] = time.perf_counter() - t0

    t0 = _stage(log, 3, f"captioning the world ({cfg.caption_backend} backend)")
    captions_dir = out / "captions"
    summary, captions, accuracy = _caption_world(cfg, sam, cap_dir, captions_dir, records, progress)
    timing["caption_s"] = time.perf_counter() - t0

    t0 = _stage(log, 4, "caption statistics: VLM captions vs alt-texts")
    report = _caption_stats(cfg, out, captions_dir, truth, progress)
    from dataset_stats.report import table_rows

    header, data_rows, _ = table_rows(report)
    timing["stats_s"] = time.perf_counter() - t0

    # 5. the three decisions, each against its absence: arms a-d (the aesthetic subset by score + select)
    _stage(log, 5, "training the arms: alt-texts, VLM captions, DiT import, aesthetic fine-tune")
    t2i = _t2i(cfg, out, captions_dir, records, log, progress)
    timing.update({f"t2i_{k}": v for k, v in t2i.pop("timing").items()})

    t0 = _stage(log, 6, "judging the arms on a suite drawn from their own captions (eval --suite own)")
    evaluation = _eval_arms(cfg, out) if cfg.judge else None
    timing["eval_s"] = time.perf_counter() - t0

    _stage(log, 7, "writing the report")
    timing["total_s"] = time.perf_counter() - t_start
    results = {
        "config": asdict(cfg),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_avg": os.getloadavg(),
        "timing": timing,
        "captioner": {"train": cap_train, "backend": cfg.caption_backend, "accuracy": accuracy,
                      "summary": dict(summary)},
        "stats": {"header": header, "rows": data_rows, "datasets": report.get("datasets")},
        "t2i": t2i,
        "eval": evaluation,
    }
    html_path = _write_outputs(out, results, _examples(records, captions, sam.parent, cfg.examples))
    log(f"report: {html_path.resolve()}")
    return results


def _write_outputs(out: Path, results: dict[str, Any], examples: list[dict[str, Any]]) -> Path:
    """The figures, results.json (with what the run cost: its ledgers and the full-size recipe from
    `plan`) and the report; `results["t2i"]` loses its images on the way. Returns report.html."""
    from costs.summary import recipe_cost
    from demo.figures import figures as draw_figures
    from demo.report import write_report

    t2i = results["t2i"]
    figures = draw_figures(out, t2i)
    results["t2i"] = {k: v for k, v in t2i.items() if k not in ("scenes", "prior_images")} | {"arms": _strip_images(t2i["arms"])}
    results["cost"] = recipe_cost(out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots = {p.stem: p for p in (out / "stats").glob("*.png")} | figures
    html_path, _ = write_report(out, results, examples, plots)
    return html_path


def _quiet_libraries() -> None:
    """Per-file "Loading weights" bars and per-batch truncation notices (the tiny T5 keeps 16
    tokens) would drown the stage log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()


def _build_world(cfg: DemoConfig, out: Path) -> tuple[Path, Path, dict]:
    """Stage 1: images in sam/<split>/ (what `caption --src` reads), ground truth in truth/<split>/.
    Returns (sam, truth, {key: (record, scene)})."""
    from tiny import world as W

    sam, truth = out / "world" / "sam", out / "world" / "truth"
    for split, n in (("train", cfg.world_train), ("heldout", cfg.world_heldout)):
        W.write_sam_folder(sam / split, n, seed=cfg.seed, image_size=cfg.image_size, split=split, meta_dir=truth / split,
                           low_quality=cfg.low_quality)
    records = {f"sam/{split}/{r['file_name']}": (r, s) for split in ("train", "heldout") for r, s in W.read_scenes(truth / split)}
    return sam, truth, records


def _train_captioner(cfg: DemoConfig, out: Path, truth: Path, log: Callable[[str], None],
                     progress: bool) -> tuple[Path, dict]:
    """Stage 2: the tiny LLaVA, trained on the train split only (reused when already trained)."""
    from demo.captioner import train_captioner

    cap_dir = out / "captioner"
    metrics = cap_dir / "captioner_metrics.json"  # written last by train_captioner: a done-marker
    cap_train = json.loads(metrics.read_text()) if metrics.exists() else None
    if cap_train and (cap_train["steps"], cap_train["seed"]) == (cfg.captioner_steps, cfg.seed):
        log("      (already trained: reusing it)")
        return cap_dir, cap_train
    metrics.unlink(missing_ok=True)
    return cap_dir, train_captioner(truth / "train", cap_dir, steps=cfg.captioner_steps, seed=cfg.seed,
                                    threads=cfg.threads, progress=progress)


def _caption_world(cfg: DemoConfig, sam: Path, cap_dir: Path, captions_dir: Path, records: dict,
                   progress: bool) -> tuple[Any, dict[str, str], dict]:
    """Stage 3: the real caption job over the whole world. Returns (summary, {key: caption},
    the captions' accuracy per split)."""
    from autolabel.api import run_caption
    from shards import iter_batches
    from tiny import judge

    summary = run_caption([sam], captions_dir, model=str(cap_dir), backend=cfg.caption_backend, temperature=0.0,
                          max_new_tokens=64, seed=cfg.seed, batch_size=32, shard_size=500, progress=progress)
    rows = [r for b in iter_batches(captions_dir, columns=["key", "caption", "error"]) for r in b.to_pylist()]
    captions = {r["key"]: r["caption"] for r in rows if r["error"] is None}
    missing = [k for k in records if k not in captions]
    if missing:
        raise RuntimeError(f"{len(missing)} world images have no caption (e.g. {missing[0]})")
    accuracy = {split: judge.score_captions([(s, captions[k]) for k, (r, s) in records.items() if r["split"] == split])
                for split in ("heldout", "train")}
    return summary, captions, accuracy


def _caption_stats(cfg: DemoConfig, out: Path, captions_dir: Path, truth: Path, progress: bool) -> dict:
    """Stage 4: the real stats job, VLM captions against alt-texts on the same images."""
    from dataset_stats.api import StatsOptions, run_stats
    from dataset_stats.report import write_outputs

    report = run_stats([f"vlm-captions={captions_dir}", f"alt-texts={truth}/*/alt_texts.parquet"],
                       StatsOptions(valid_min=10, repeats=5, seed=cfg.seed, progress=progress))
    write_outputs(report, out / "stats")
    return report


def _strip_images(arms: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in arms.items()}


def _t2i(cfg: DemoConfig, out: Path, captions_dir: Path, records: dict, log: Callable[[str], None],
         progress: bool) -> dict[str, Any]:
    """Stages 5-6: the tiny models, the arm shards, the aesthetic subset (score + select), arms
    a-c with their curves, arm d, and the aesthetic score of samples before and after."""
    import time

    from demo.aesthetic_stage import WHERE, AestheticJudge, compare, ground_truth, run_finetune, select_subset
    from demo.arms import arm_claims, run_arms, write_arm_shards
    from tiny import world as W
    from tiny.pixart import build_tiny_text_encoder

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    shards = {text: out / f"t2i_shards_{text}" for text in ("vlm", "alt")}
    rows = {text: write_arm_shards(captions_dir, records, d, text) for text, d in shards.items()}
    corpus = [W.dense_caption(s) for s in W.sample_scenes(400, cfg.seed + 99, "any")]
    corpus += [W.dense_caption(s) for _, s in records.values()] + [r["alt_text"] for r, _ in records.values()]
    tiny = out / "tiny_models"
    if not (tiny / "t5" / "text_encoder").exists():
        build_tiny_text_encoder(tiny / "t5", corpus)
    timing["models_s"] = time.perf_counter() - t0

    log("      stage 3 data: scoring the training images and selecting the aesthetic subset (score + select)")
    t0 = time.perf_counter()
    subset = select_subset(out / "curate", shards["vlm"], records, cfg.seed, cfg.rated, cfg.clip_steps, progress)
    timing["score_select_s"] = time.perf_counter() - t0

    s = _arm_settings(cfg, tiny / "t5", progress)
    scenes = W.sample_scenes(cfg.curve_prompts, cfg.seed + 2024, "heldout")
    prompts = [W.dense_caption(sc) for sc in scenes]
    res = run_arms(s, out / "t2i", shards, cfg.dit_steps, scenes, prompts, cfg.seed, log)
    timing.update(res["timing"])
    arms = res["arms"]
    t0 = time.perf_counter()
    arms["d"] = run_finetune(s, out / "t2i", subset, out / "t2i" / "arm-c", cfg.finetune_steps, scenes, prompts, cfg.seed, log,
                             lr=cfg.finetune_lr or cfg.lr)
    arms["d"]["label"] = "(c) + aesthetic fine-tune"
    timing["finetune_s"] = time.perf_counter() - t0

    judge = AestheticJudge(subset["clip"], subset["head"])
    threshold = float(WHERE.split(">=")[1])
    aesthetic = {"where": WHERE, "samples": compare(judge, arms["c"]["images"], arms["d"]["images"], threshold),
                 "real_heldout": ground_truth(judge, records, cfg.t2i_resolution, out / "world"), "subset": subset}
    claims = arm_claims(arms, cfg.arm_steps)
    ceiling = Path(cfg.vae) / "round_trip.json"  # the judge on the VAE's round trips (demo.vae)
    return {"arms": arms, "prior": res["prior"], "prior_images": res["prior_images"], "aesthetic": aesthetic,
            "claims": claims, "timing": timing, "rows": rows,
            "vae_ceiling": json.loads(ceiling.read_text()) if ceiling.exists() else None,
            "resolution": cfg.t2i_resolution, "steps": cfg.arm_steps, "dit_steps": cfg.dit_steps,
            "dit_classes": cfg.dit_classes, "prompts": prompts, "scenes": scenes}


def _eval_arms(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Arms a-d's final checkpoints on the own-captions suite, judged by `cfg.judge` (demo.eval_stage)."""
    from demo.eval_stage import EvalStageSettings, eval_arms

    settings = EvalStageSettings(judge=cfg.judge, prompts=cfg.eval_prompts, min_count=cfg.eval_min_count,
                                 captions=cfg.eval_captions, sampler_steps=cfg.sampler_steps, seed=cfg.seed)
    arm_dirs = {arm: out / "t2i" / f"arm-{arm}" for arm in "abcd"}
    return eval_arms(arm_dirs, out / "t2i_shards_vlm", out / "eval", settings)


def _arm_settings(cfg: DemoConfig, text_encoder: Path, progress: bool):
    """What every arm shares: the tiny manifest's first stage with the demo's model, resolution,
    objective settings and seed, and the curve's judging schedule."""
    from demo.arms import ArmSettings
    from t2i.manifest import load_manifest

    base = load_manifest(cfg.t2i_manifest).stages[0].config
    base.vae, base.text_encoder, base.resolution, base.seed = cfg.vae, str(text_encoder), cfg.t2i_resolution, cfg.seed
    base.preset, base.lr, base.threads, base.max_tokens = cfg.preset, cfg.lr, cfg.threads, cfg.max_tokens or base.max_tokens
    base.objective = cfg.objective
    if cfg.objective == "flow":
        base.timestep_density = cfg.timestep_density
    else:
        base.prediction_type, base.timestep_power = cfg.prediction_type, cfg.timestep_power
    base.text_dtype = cfg.text_dtype or base.text_dtype
    return ArmSettings(base=base, steps=cfg.arm_steps, curve_every=max(cfg.arm_steps // cfg.curve_points, 1),
                       sampler_steps=cfg.sampler_steps, guidance=4.5, progress=progress, dit_classes=cfg.dit_classes,
                       dit_lr=cfg.dit_lr)


def _examples(records: dict, captions: dict, world_root: Path, n: int) -> list[dict[str, Any]]:
    from PIL import Image

    out = []
    for split in ("heldout", "train"):
        keys = [k for k, (r, _) in records.items() if r["split"] == split][: max(1, n // 2)]
        for k in keys:
            r, _ = records[k]
            out.append({"image": Image.open(world_root / k).convert("RGB"), "alt_text": r["alt_text"],
                        "caption": captions.get(k), "split": split})
    return out
