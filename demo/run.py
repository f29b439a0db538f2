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

from shards.errors import UserError

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


@dataclass
class DemoConfig:
    """Sizes of the miniature world and of each stage. `quick()` is the test-suite version."""

    out: str = "demo_out"
    seed: int = 0
    world_train: int = 1200  # images whose (colour, shape, position) may be seen in training
    world_heldout: int = 150  # images of combinations never seen in any training
    image_size: int = 64  # the world's "photos"
    captioner_steps: int = 1200
    caption_backend: str = "transformers"
    t2i_manifest: str = str(MANIFESTS / "tiny-cpu.toml")
    t2i_steps: int = 3000
    t2i_resolution: int = 16
    samples_per_split: int = 60  # generated images judged per prompt split
    examples: int = 12  # images shown with alt-text and caption
    threads: int = 2

    @classmethod
    def quick(cls, out: str, seed: int = 0) -> "DemoConfig":
        return cls(out=out, seed=seed, world_train=160, world_heldout=24, captioner_steps=60, t2i_steps=40,
                   samples_per_split=8, examples=4)


def _stage(log: Callable[[str], None], n: int, title: str) -> float:
    log(f"[{n}/6] {title}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Run every stage into `cfg.out`; returns the measured results (also in results.json)."""
    import torch
    from transformers.utils import logging as hf_logging

    from demo import world as W

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would drown the stage log
    hf_logging.set_verbosity_error()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the tiny T5 keeps 16 tokens and the pipeline says so per batch
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. the world: images in sam/<split>/ (what `caption --src` reads), ground truth in truth/<split>/
    t0 = _stage(log, 1, "building the world")
    sam, truth = out / "world" / "sam", out / "world" / "truth"
    for split, n in (("train", cfg.world_train), ("heldout", cfg.world_heldout)):
        W.write_sam_folder(sam / split, n, seed=cfg.seed, image_size=cfg.image_size, split=split, meta_dir=truth / split)
    records = {f"sam/{split}/{r['file_name']}": (r, s) for split in ("train", "heldout") for r, s in W.read_scenes(truth / split)}
    timing["world_s"] = time.perf_counter() - t0

    # 2. the captioner, trained on the train split only
    t0 = _stage(log, 2, "training the captioner (a tiny LLaVA)")
    from demo.captioner import train_captioner

    cap_dir = out / "captioner"
    metrics = cap_dir / "captioner_metrics.json"  # written last by train_captioner: a done-marker
    cap_train = json.loads(metrics.read_text()) if metrics.exists() else None
    if not cap_train or (cap_train["steps"], cap_train["seed"]) != (cfg.captioner_steps, cfg.seed):
        metrics.unlink(missing_ok=True)
        cap_train = train_captioner(truth / "train", cap_dir, steps=cfg.captioner_steps, seed=cfg.seed,
                                    threads=cfg.threads, progress=progress)
    else:
        log("      (already trained: reusing it)")
    timing["captioner_s"] = time.perf_counter() - t0

    # 3. caption the whole world with the real caption job
    t0 = _stage(log, 3, f"captioning the world ({cfg.caption_backend} backend)")
    from autolabel.api import run_caption
    from shards import iter_batches

    captions_dir = out / "captions"
    summary = run_caption([sam], captions_dir, model=str(cap_dir), backend=cfg.caption_backend, temperature=0.0,
                          max_new_tokens=64, seed=cfg.seed, batch_size=32, shard_size=500, progress=progress)
    rows = [r for b in iter_batches(captions_dir, columns=["key", "caption", "error"]) for r in b.to_pylist()]
    captions = {r["key"]: r["caption"] for r in rows if r["error"] is None}
    missing = [k for k in records if k not in captions]
    if missing:
        raise RuntimeError(f"{len(missing)} world images have no caption (e.g. {missing[0]})")
    accuracy = {split: W.score_captions([(s, captions[k]) for k, (r, s) in records.items() if r["split"] == split])
                for split in ("heldout", "train")}
    timing["caption_s"] = time.perf_counter() - t0

    # 4. stats: VLM captions against alt-texts, on the same images
    t0 = _stage(log, 4, "caption statistics: VLM captions vs alt-texts")
    from dataset_stats.api import StatsOptions, run_stats
    from dataset_stats.report import table_rows, write_outputs

    report = run_stats([f"vlm-captions={captions_dir}", f"alt-texts={truth}/*/alt_texts.parquet"],
                       StatsOptions(valid_min=10, repeats=5, seed=cfg.seed, progress=progress))
    write_outputs(report, out / "stats")
    header, data_rows, _ = table_rows(report)
    timing["stats_s"] = time.perf_counter() - t0

    # 5. the text-to-image model, trained on the VLM captions of the train split only
    t0 = _stage(log, 5, "training a tiny PixArt on the VLM captions")
    t2i = _train_t2i(cfg, out, captions_dir, records, progress)
    timing["t2i_s"] = time.perf_counter() - t0

    # 6. report
    _stage(log, 6, "writing the report")
    timing["total_s"] = time.perf_counter() - t_start
    from costs.summary import recipe_cost

    results = {
        "config": asdict(cfg),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "timing": timing,
        "captioner": {"train": cap_train, "backend": cfg.caption_backend, "accuracy": accuracy,
                      "summary": summary.as_dict() if hasattr(summary, "as_dict") else asdict(summary)},
        "stats": {"header": header, "rows": data_rows, "datasets": report.get("datasets")},
        "t2i": t2i["results"],
        "cost": recipe_cost(out),  # this run's ledgers, and the full-size recipe from `plan`
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    examples = _examples(records, captions, sam.parent, cfg.examples)
    plots = {p.stem: p for p in (out / "stats").glob("*.png")}
    plots["loss"] = t2i["loss_png"]
    from demo.report import write_report

    html_path, _ = write_report(out, results, examples, t2i["samples"], plots)
    log(f"report: {html_path.resolve()}")
    return results


def _t2i_shards(captions_dir: Path, records: dict, out_dir: Path) -> int:
    """The VLM-captioned train-split images as their own shard set (held-out combos excluded)."""
    from shards import ShardWriter, clean_incomplete, complete_shards, iter_batches

    if complete_shards(out_dir) and (out_dir / "manifest.json").exists():
        return json.loads((out_dir / "manifest.json").read_text())["rows"]
    clean_incomplete(out_dir)
    for p in out_dir.glob("*.parquet*"):
        p.unlink()
    w = ShardWriter(out_dir, rows_per_shard=2000, writer_id="00000000")
    for batch in iter_batches(captions_dir):
        for row in batch.to_pylist():
            rec = records.get(row["key"])
            if rec and rec[0]["split"] == "train" and row["error"] is None:
                w.add(row)
    return w.close()["rows"]


def _train_t2i(cfg: DemoConfig, out: Path, captions_dir: Path, records: dict, progress: bool) -> dict[str, Any]:
    from demo import world as W
    from t2i.checkpoint import latest_checkpoint
    from t2i.manifest import load_manifest, run_manifest
    from t2i.sample import generate, pipeline_from_checkpoint
    from t2i.tiny import build_tiny_models

    shards_dir = out / "t2i_shards"
    n = _t2i_shards(captions_dir, records, shards_dir)
    scenes_probe = W.sample_scenes(400, cfg.seed + 99, "any")
    corpus = [W.dense_caption(s) for s in scenes_probe] + [W.dense_caption(s) for _, s in records.values()]
    tiny = out / "tiny_models"
    if not (tiny / "vae").exists() or not (tiny / "t5").exists():
        build_tiny_models(tiny, corpus)
    t0 = time.perf_counter()
    manifest = load_manifest(cfg.t2i_manifest)
    run_manifest(manifest, out / "t2i", shards_dir, resume=True, progress=progress,
                 overrides={"vae": str(tiny / "vae"), "text_encoder": str(tiny / "t5"), "steps": cfg.t2i_steps,
                            "resolution": cfg.t2i_resolution, "seed": cfg.seed})
    train_s = time.perf_counter() - t0
    stage_dir = out / "t2i" / manifest.stages[-1].config.name  # a finished stage is skipped on rerun
    ck = latest_checkpoint(stage_dir)
    log_path = stage_dir / "log.jsonl"
    pipe, null = pipeline_from_checkpoint(ck)

    # prompts: dense captions of fresh scenes, of seen and of held-out (never trained) combinations
    score, samples = {}, []
    for split, name in (("train", "train-combos"), ("heldout", "heldout-combos")):
        scenes = W.sample_scenes(cfg.samples_per_split, cfg.seed + 2024, split)
        prompts = [W.dense_caption(s) for s in scenes]
        images = generate(pipe, null, prompts, steps=20, guidance=4.5, seed=cfg.seed)
        score[name] = W.score(list(zip(scenes, images)), attributes=("color", "position", "shape"))
        for s, p, im in list(zip(scenes, prompts, images))[:8]:
            samples.append({"image": im.resize((96, 96), 0), "prompt": p, "split": name, "judged": W.judge_image(im)})
    loss_png = _plot_loss(log_path, out / "t2i_loss.png")
    steps = max((json.loads(l)["step"] for l in log_path.read_text().splitlines() if l.strip()), default=0)
    return {"results": {"steps": steps, "samples": n, "resolution": cfg.t2i_resolution, "seconds": train_s,
                        "score": score, "checkpoint": str(ck)},
            "samples": samples, "loss_png": loss_png}


def _plot_loss(log_path: Path, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE + VLB)")
    ax.set_yscale("log")
    ax.set_title("tiny PixArt on VLM captions")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


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
