"""`t2i-data plan`: what a manifest's recipe costs before it runs.

One row per step: captioning (per dataset), features (per dataset and feature resolution), each
training stage. Each row: images, FLOPs, GPU-hours/days, wall-clock hours on the stage's GPUs, $,
kWh and kgCO2e. The model is the one MFU is defined by:

    GPU-seconds = FLOPs / (peak FLOP/s x MFU)

with FLOPs from `t2i.models.flops_per_image` (training: 3x the forward matmuls; a stage's token
dropping counted: its routed blocks at the tokens they keep; REPA's projector on every token), the
features' encoders (VAE, T5 and a stage's REPA teacher, whose stored patch tokens the features row
also counts in bytes per image), the peak from
`shards.gpus`, and the MFU measured (a `benchmarks/gpu_bench.py` JSON) or assumed (stated in the
output). Energy = GPU-hours x board power x PUE; CO2e = energy x grid intensity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from costs.plan_options import FEATURES, MfuRule, PlanOptions, feature_rates, load_gpu_bench, parse_count, parse_images  # noqa: F401 - API
from shards.gpus import GPU, get_gpu, match_device_name
from shards.errors import UserError
from shards.ledger import GRID_GCO2_KWH


# Default training MFU by architecture, used when neither --mfu nor --gpu-bench gives one.
# Ampere and newer: this trainer measured 34.0% on an H100 (XL/2, 256 px, bf16, regional compile;
# benchmarks/results/gpu_bench_run1.json), assumed to carry over. Volta (no bf16, no FlashAttention):
# 21%, the PixArt-alpha paper's own aggregate over its stages (BENCHMARKS.md "plan").
DEFAULT_MFU = {"volta": 0.21, "ampere": 0.34, "ada": 0.34, "hopper": 0.34}

# Captioning anchor: the paper captioned ~10M SAM images with LLaVA-7B in ~24 h on 64 V100s
# (RECIPE.md): 1.81 img/s per V100. Decoding is memory-bound, so other GPUs scale by bandwidth.
CAPTION_ANCHOR = {"gpu": "V100", "images_per_s": 10e6 / (64 * 24 * 3600), "source": "paper: ~10M SAM images, 24 h on 64 V100"}
# LLaVA-1.5-7B: ~7.06e9 parameters x 2 FLOPs x ~900 tokens (576 image + ~70 prompt + ~250 generated)
CAPTION_FLOPS_PER_IMAGE = 2 * 7.06e9 * 900

VAE_FACTOR = 8  # SD VAE family: latent side = image side / 8


@dataclass
class Row:
    step: str  # caption | features | train
    name: str
    images: float
    flops: float
    gpu_hours: float
    gpus: int
    basis: str  # the rate or MFU the hours come from
    usd: float | None = None
    kwh: float = 0.0
    kg_co2e: float = 0.0
    teacher_bytes_per_image: int = 0  # features: the REPA teacher's patch tokens each image adds to the cache

    @property
    def gpu_days(self) -> float:
        return self.gpu_hours / 24

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "gpu_days": self.gpu_days, "wall_hours": self.gpu_hours / self.gpus}


def bench_device(report: dict[str, Any]) -> GPU | None:
    return match_device_name(str(report.get("device", "")))


def bench_mfu(report: dict[str, Any], latent: int) -> tuple[float, int] | None:
    """(best training MFU the bench measured at `latent`, or at the nearest latent it ran; that latent)."""
    rows = [r for r in report.get("results", []) if r.get("mfu") and r.get("latent")]
    if not rows:
        return None
    near = min({r["latent"] for r in rows}, key=lambda l: (abs(l - latent), -l))
    return max(r["mfu"] for r in rows if r["latent"] == near), near


def stage_mfu(stage, gpu: GPU, opts: PlanOptions) -> tuple[float, str]:
    """The MFU a stage is priced at, and where it comes from."""
    cfg = stage.config
    given = opts.mfu.lookup(cfg.name, cfg.resolution)
    if given is not None:
        return given, "--mfu"
    if opts.gpu_bench:
        got = bench_mfu(opts.gpu_bench, cfg.resolution // VAE_FACTOR)
        if got is not None:
            where = "" if got[1] == cfg.resolution // VAE_FACTOR else f" at {got[1] * VAE_FACTOR} px (nearest run)"
            return got[0], f"measured{where} on {opts.gpu_bench.get('device', '?')}"
    return DEFAULT_MFU[gpu.arch], f"assumed ({gpu.arch} default)"


def check_stage(stage, opts: PlanOptions, source: str) -> int:
    """The stage's GPU count; a UserError naming the stage and what it lacks (steps, batch, gpus)."""
    cfg, given = stage.config, stage.given
    missing = [what for what, ok in (("steps", "steps" in given),
                                     ("batch_size or global_batch", "batch_size" in given or "global_batch" in given)) if not ok]
    if missing:
        raise UserError(f"{source} stage {cfg.name!r} has no {' and no '.join(missing)}: set them in the stage or in [defaults] to plan it")
    gpus = stage.gpus or opts.gpus
    if gpus is None and not cfg.global_batch:
        raise UserError(f"{source} stage {cfg.name!r} gives batch_size per GPU but no gpus: add gpus = N to the stage or pass --gpus N")
    if gpus is not None and (not isinstance(gpus, int) or gpus < 1):
        raise UserError(f"{source} stage {cfg.name!r}: gpus = {gpus!r} should be a whole number >= 1")
    return gpus or 1


def caption_channels(text_encoder: str) -> int:
    """T5 v1.1 encoder width from its name (XXL: 4096, the paper's); 4096 when the name says nothing."""
    name = text_encoder.lower()
    for size, width in (("xxl", 4096), ("xl", 2048), ("large", 1024), ("base", 768), ("small", 512)):
        if size in name:
            return width
    return 4096


def train_row(stage, gpu: GPU, opts: PlanOptions, source: str) -> Row:
    from t2i.kinds import conditioning_class
    from t2i.models import flops_per_image

    cfg = stage.config
    gpus = check_stage(stage, opts, source)
    per_step = (cfg.global_batch or cfg.batch_size * gpus) * cfg.grad_accum
    images = float(cfg.steps * per_step)
    latent = cfg.resolution // VAE_FACTOR
    routed, lever = routed_of(cfg)
    flops = images * flops_per_image(cfg.preset, (latent, latent), cfg.max_tokens, caption_channels(cfg.text_encoder),
                                     cross_attention=conditioning_class(cfg.kind).cross_attention,  # a class-conditional DiT has none
                                     token_drop=cfg.token_drop, routed_blocks=routed, token_macs=repa_macs(cfg), **kv_of(cfg))
    lever += f"; REPA lambda {cfg.repa_weight:g}" if cfg.repa_weight else ""
    if cfg.kv_compress > 1:
        lever += f"; KV compression r{cfg.kv_compress} on {kv_of(cfg)['kv_blocks']} blocks"
    if cfg.lora_rank:
        lora = lora_stage_price(cfg.preset, cfg.resolution, cfg.lora_rank, cfg.lora_targets, cfg.lora_variant, cfg.max_tokens,
                                caption_channels(cfg.text_encoder), cfg.token_drop, routed, repa_macs(cfg), **kv_of(cfg))
        flops = images * lora["step_flops_per_image"]
        lever += (f"; LoRA r{cfg.lora_rank}: {lora['trainable_params'] / 1e6:.1f}M trainable, AdamW state "
                  f"{lora['optimizer_bytes'] / 2**20:.0f} MiB, step FLOPs {lora['step_flops_per_image'] / lora['full_step_flops_per_image']:.0%} of full")
    mfu, basis = stage_mfu(stage, gpu, opts)
    hours = flops / (gpu.peak_flops * mfu) / 3600
    if cfg.text_dtype == "ids" and conditioning_class(cfg.kind).cross_attention:  # T5 encodes each step's captions
        t5, t5_mfu = t5_per_caption(cfg, opts)
        lever += f"; T5 on demand (text_dtype ids): +{t5 * images / flops:.0%} FLOPs at T5 MFU {t5_mfu:.1%}"
        flops, hours = flops + images * t5, hours + images * t5 / (gpu.peak_flops * t5_mfu) / 3600
    return Row("train", cfg.name, images, flops, hours, gpus, f"MFU {mfu:.1%} {basis}{lever}")


def t5_per_caption(cfg, opts: PlanOptions) -> tuple[float, float]:
    """(T5 encoder FLOPs of one caption at the stage's max_tokens, T5's MFU): FEATURES, or a --gpu-bench's."""
    f = feature_rates(opts)[0]
    return f["t5_gflop_per_caption"] * 1e9 * cfg.max_tokens / f["tokens"], f["t5_mfu"]


def lora_stage_price(preset: str, resolution: int, lora_rank: int, lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
                     lora_variant: str = "lora", max_tokens: int = 120, channels: int = 4096, token_drop: float = 0.0,
                     routed_blocks: int = 0, token_macs: int = 0, kv_compress: int = 1, kv_blocks: int = 0) -> dict[str, float]:
    """What a stage trains and computes, with LoRA of `lora_rank` (0: a full fine-tune): trainable
    parameters (counted on the preset's model, built on the meta device), AdamW state bytes (two
    fp32 moments each: 8 bytes a parameter) and training FLOPs per image. A LoRA step runs the
    forward (1x) and the input gradients (1x) of every matmul but no frozen weight gradient (the
    third 1x), plus the adapter's own matmuls x3: about 2/3 of a full step. `token_macs`: a
    module outside the blocks that trains in full on every token (REPA's projector): its weights
    (biases left out) train, and its matmuls cost the full 3x."""
    import torch
    from torch import nn

    from t2i.models import Preset, build_transformer, flops_per_image, get_preset

    p, latent = get_preset(preset), resolution // VAE_FACTOR
    with torch.device("meta"):
        tr = build_transformer(Preset(p.depth, p.hidden, p.heads, p.patch), latent, channels, use_additional_conditions=False)
    full = flops_per_image(preset, (latent, latent), max_tokens, channels, token_drop=token_drop, routed_blocks=routed_blocks,
                           token_macs=token_macs, kv_compress=kv_compress, kv_blocks=kv_blocks)
    if not lora_rank:
        n = sum(x.numel() for x in tr.parameters())
        return {"trainable_params": n, "optimizer_bytes": 8 * n, "step_flops_per_image": full, "full_step_flops_per_image": full}
    tokens = (latent // p.patch) ** 2
    side = 3 * 2 * tokens * token_macs  # the fully trained side module, already in `full`
    params, macs = token_macs, 0
    for name, m in tr.named_modules():
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in lora_targets):
            n = lora_rank * (m.in_features + m.out_features) + (m.out_features if lora_variant == "dora" else 0)
            params += n
            caption_side = ".attn2.to_k" in name or ".attn2.to_v" in name  # cross-attention keys/values: caption tokens
            macs += lora_rank * (m.in_features + m.out_features) * (max_tokens if caption_side else tokens)
    return {"trainable_params": params, "optimizer_bytes": 8 * params, "step_flops_per_image": (full - side) * 2 / 3 + side + 3 * 2 * macs,
            "full_step_flops_per_image": full}


def kv_of(cfg) -> dict[str, int]:
    """flops_per_image's KV-compression arguments of a stage (t2i.sigma): the stride and how many blocks."""
    from t2i.models import get_preset

    if cfg.kv_compress <= 1:
        return {}
    return {"kv_compress": cfg.kv_compress, "kv_blocks": len(set(cfg.kv_compress_layers)) or get_preset(cfg.preset).depth}


def routed_of(cfg) -> tuple[int, str]:
    """(blocks a stage's token dropping routes, the basis note) from its preset's depth; (0, "") without."""
    from t2i.models import get_preset
    from t2i.routing import routed_blocks

    if not cfg.token_drop:
        return 0, ""
    depth = get_preset(cfg.preset).depth
    start, end = routed_blocks(depth, cfg.token_drop_start, cfg.token_drop_end)
    return end - start, f"; token_drop {cfg.token_drop:.0%} on {end - start} of {depth} blocks"


def repa_macs(cfg) -> int:
    """Multiply-adds per token of a stage's REPA projector (t2i.repa; 0 without REPA)."""
    from t2i.models import get_preset
    from t2i.repa import projector_macs, projector_width
    from t2i.teacher import shape_of

    if not cfg.repa_weight:
        return 0
    hidden = get_preset(cfg.preset).hidden
    return projector_macs(hidden, projector_width(hidden, cfg.repa_proj), shape_of(cfg.teacher).hidden)


def teacher_cost(cfg) -> tuple[float, int, str]:
    """(FLOPs per image, stored bytes per image, basis note) of a stage's REPA teacher in features
    (t2i.teacher: one forward per image at its own input size); (0, 0, "") without a teacher."""
    from t2i.teacher import shape_of

    if not cfg.teacher:
        return 0.0, 0, ""
    shape = shape_of(cfg.teacher)
    rows, cols = shape.grid(cfg.resolution, cfg.resolution)
    size = rows * cols * shape.hidden * {"float32": 4}.get(cfg.teacher_dtype, 2)
    return shape.forward_flops(cfg.resolution, cfg.resolution), size, f"; teacher {rows}x{cols}x{shape.hidden} patches, {size:,} B/image"


def dataset_of(stage, names: list[str]) -> str | None:
    """The --images dataset a stage reads: the name found in its shards path (longest match)."""
    path = (stage.shards or "").lower()
    hits = [n for n in names if n.lower() in path]
    return max(hits, key=len) if hits else None


def feature_rows(manifest, gpu: GPU, opts: PlanOptions, gpus: int) -> list[Row]:
    """One row per (dataset, feature resolution) the stages need: VAE at that size + T5 per caption
    field (`caption_fields`: each field of each image is encoded once)."""
    f, src = feature_rates(opts)
    seen, rows = set(), []
    for stage in manifest.stages:
        cfg, ds = stage.config, dataset_of(stage, list(opts.images))
        key = (ds, cfg.resolution, cfg.max_tokens, cfg.caption_fields, cfg.teacher, cfg.teacher_dtype, cfg.text_dtype == "ids")
        if ds is None or key in seen:
            continue
        seen.add(key)
        vae = f["vae_gflop_per_image"] * 1e9 * (cfg.resolution / f["resolution"]) ** 2
        ids = cfg.text_dtype == "ids"  # token ids only: T5 runs in training instead (train_row)
        t5 = 0.0 if ids else t5_per_caption(cfg, opts)[0] * len(cfg.caption_fields)
        teacher, size, note = teacher_cost(cfg)  # a ViT encoder, priced at T5's MFU
        seconds = vae / (gpu.peak_flops * f["vae_mfu"]) + (t5 + teacher) / (gpu.peak_flops * f["t5_mfu"])
        n = opts.images[ds]
        rows.append(Row("features", f"{ds} @ {cfg.resolution} px", n, n * (vae + t5 + teacher), n * seconds / 3600, gpus,
                        f"VAE MFU {f['vae_mfu']:.1%}, " + ("T5 in training (text_dtype ids)" if ids else f"T5 MFU {f['t5_mfu']:.1%}")
                        + f" ({src}){note}", teacher_bytes_per_image=size))
    return rows


def caption_rate(gpu: GPU, opts: PlanOptions) -> tuple[float, str]:
    """Captioner images/s per GPU on `gpu`, and where it comes from."""
    if opts.caption_rate:
        return opts.caption_rate, "--caption-rate"
    cap = (opts.gpu_bench or {}).get("captioner") or {}
    batches = [b for b in cap.get("batches", []) if b.get("images_per_s")]
    bench_gpu = bench_device(opts.gpu_bench or {})
    if batches and bench_gpu:
        best = max(batches, key=lambda b: b["images_per_s"])
        rate = best["images_per_s"] * gpu.mem_gbps / bench_gpu.mem_gbps
        return rate, (f"measured {best['images_per_s']:.2f} img/s on {bench_gpu.name} ({cap.get('model', '?')}, batch {best['batch']}, "
                      f"{cap.get('max_new_tokens', '?')} new tokens), scaled by memory bandwidth")
    anchor = get_gpu(CAPTION_ANCHOR["gpu"])
    rate = CAPTION_ANCHOR["images_per_s"] * gpu.mem_gbps / anchor.mem_gbps
    return rate, f"{CAPTION_ANCHOR['images_per_s']:.2f} img/s per V100 ({CAPTION_ANCHOR['source']}), scaled by memory bandwidth"


def caption_rows(gpu: GPU, opts: PlanOptions, gpus: int) -> list[Row]:
    names = opts.captioned if opts.captioned is not None else list(opts.images)
    unknown = [n for n in names if n not in opts.images]
    if unknown:
        raise UserError(f"--captioned {', '.join(unknown)} not in --images: use one of {', '.join(opts.images) or '(none given)'}")
    rate, basis = caption_rate(gpu, opts)
    return [Row("caption", n, opts.images[n], opts.images[n] * CAPTION_FLOPS_PER_IMAGE, opts.images[n] / rate / 3600, gpus,
                f"{rate:.2f} img/s per GPU: {basis}") for n in names]


def price(row: Row, gpu: GPU, opts: PlanOptions) -> Row:
    """Fill in $, kWh (board power x PUE) and kgCO2e."""
    row.usd = row.gpu_hours * opts.price if opts.price is not None else None
    row.kwh = row.gpu_hours * gpu.watts / 1000 * opts.pue
    row.kg_co2e = row.kwh * opts.grid_gco2_kwh / 1000
    return row


def plan_command(manifest_path: str | Path, opts: PlanOptions, note: Callable[[str], None] = print) -> str:
    """`t2i-data plan`: the plan, written to `opts.out` when set (`note` says where), then what
    the command prints: Markdown, or JSON."""
    opts.validate()
    result = plan(manifest_path, opts)
    if opts.out is not None:
        note(f"wrote {', '.join(str(p) for p in write_plan(result, opts.out))}")
    return json.dumps(result, indent=2) if opts.json_out else to_markdown(result)


def plan(manifest_path: str | Path, opts: PlanOptions) -> dict[str, Any]:
    """The cost of every step of a manifest's recipe on `opts.gpu`; see the module docstring."""
    from t2i.manifest import load_manifest

    gpu = get_gpu(opts.gpu)
    manifest = load_manifest(manifest_path)
    source = str(manifest_path)
    train = [train_row(s, gpu, opts, source) for s in manifest.stages]
    job_gpus = opts.gpus or max(r.gpus for r in train)
    rows = caption_rows(gpu, opts, job_gpus) + feature_rows(manifest, gpu, opts, job_gpus) + train
    rows = [price(r, gpu, opts) for r in rows]
    unused = [n for n in opts.images if not any(dataset_of(s, [n]) for s in manifest.stages)]
    totals = {k: sum(getattr(r, k) for r in rows) for k in ("images", "flops", "gpu_hours", "kwh", "kg_co2e")}
    totals["gpu_days"] = totals["gpu_hours"] / 24
    totals["usd"] = sum(r.usd for r in rows) if opts.price is not None else None
    totals["train_gpu_days"] = sum(r.gpu_hours for r in train) / 24
    return {"manifest": manifest.name, "gpu": gpu.__dict__, "rows": [r.as_dict() for r in rows], "totals": totals,
            "assumptions": assumptions(gpu, opts, unused)}


def assumptions(gpu: GPU, opts: PlanOptions, unused: list[str]) -> list[str]:
    out = [
        f"{gpu.name}: {gpu.peak_flops / 1e12:.0f} TFLOP/s dense 16-bit peak, {gpu.watts:.0f} W board power (shards/gpus.py, vendor datasheets)",
        "GPU-hours = FLOPs / (peak x MFU); training FLOPs = 3 x forward matmuls per image (t2i.models.flops_per_image; "
        "activation recomputation with gradient checkpointing is not counted, it lowers the MFU instead)",
        f"MFU per stage: as in each row (--mfu, else a --gpu-bench JSON, else {DEFAULT_MFU[gpu.arch]:.0%} for {gpu.arch})",
        f"image side / latent side = {VAE_FACTOR} (SD VAE); multi-aspect buckets priced as square images of the stage resolution",
        f"captioning: every image of {', '.join(opts.captioned if opts.captioned is not None else opts.images) or 'no dataset'}; "
        f"FLOPs ~ 2 x 7.06e9 parameters x 900 tokens per image (LLaVA-1.5-7B)",
        "features: VAE encoder at each stage resolution + T5 per caption, once per dataset and resolution (the features cache key); "
        "with text_dtype ids, T5 runs in training instead, once per sample per step, at T5's MFU",
        "token dropping (token_drop): the routed blocks counted at the tokens they keep, the others at all of them; the MFU "
        "is taken as without it (measured on CPU: BENCHMARKS.md levers_bench)",
        "REPA: the teacher's forward in features (its patch grid at its own input size, at T5's MFU) and its stored patch "
        "tokens (bytes per image in the features row); in training the projector's matmuls on every token",
        f"power: board power for the whole GPU-hour (an upper bound; busy training GPUs draw close to it), x PUE {opts.pue}",
        f"grid intensity {opts.grid_gco2_kwh:.0f} gCO2e/kWh" + (" (world average, IEA 2019)" if opts.grid_gco2_kwh == GRID_GCO2_KWH else ""),
        "$: " + (f"{opts.price} per GPU-hour" if opts.price is not None else "no --price given"),
        "not counted: evaluation, sampling, failed runs, data download and storage, the DiT import (the paper's ImageNet stage)",
    ]
    if opts.gpu_bench and bench_device(opts.gpu_bench) and bench_device(opts.gpu_bench).name != gpu.name:
        out.append(f"MFU and encoder efficiencies measured on {opts.gpu_bench.get('device')} are applied to {gpu.name} as they are")
    if unused:
        out.append(f"--images {', '.join(unused)}: no stage reads it (captioned only)")
    return out


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def to_markdown(result: dict[str, Any]) -> str:
    """The plan as a Markdown table with its totals and assumptions."""
    t = result["totals"]
    lines = [f"# Plan: {result['manifest']} on {result['gpu']['name']}", "",
             "| step | name | images | PFLOP | GPU-hours | GPU-days | GPUs | wall hours | $ | kWh | kgCO2e | basis |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['name']} | {r['images']:,.0f} | {_num(r['flops'] / 1e15, 0)} | {_num(r['gpu_hours'])} | "
                     f"{_num(r['gpu_days'])} | {r['gpus']} | {_num(r['wall_hours'])} | {_num(r['usd'], 0)} | {_num(r['kwh'], 0)} | "
                     f"{_num(r['kg_co2e'], 0)} | {r['basis']} |")
    lines.append(f"| **total** | | | {_num(t['flops'] / 1e15, 0)} | {_num(t['gpu_hours'])} | {_num(t['gpu_days'])} | | | "
                 f"{_num(t['usd'], 0)} | {_num(t['kwh'], 0)} | {_num(t['kg_co2e'], 0)} | |")
    lines += ["", "Assumptions:", ""] + [f"- {a}" for a in result["assumptions"]]
    return "\n".join(lines) + "\n"


def write_plan(result: dict[str, Any], out: str | Path) -> list[Path]:
    """plan.json and plan.md in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    (out / "plan.md").write_text(to_markdown(result))
    return [out / "plan.json", out / "plan.md"]
