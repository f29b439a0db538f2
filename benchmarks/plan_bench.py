"""Does `t2i-data plan` reproduce the PixArt-alpha paper's cost? Writes the "plan" section of BENCHMARKS.md.

The paper's stage table (../shared/RECIPE.md): 1,656 V100-days in all, of which 88 for the ImageNet
pixel-dependency stage (which manifests/pixart-alpha.toml replaces by importing a trained DiT) and
1,568 for the four stages the manifest has. This script plans the manifest on V100:

1. the MFU that reproduces each stage exactly (FLOPs / (peak x paper V100-days));
2. a flat MFU (one number for every stage) and the stated assumption, with each stage's error;
3. the whole recipe (captioning + features + training) on the GPUs of the table, at this trainer's
   measured H100 MFU (benchmarks/results/gpu_bench_run1.json).

    python benchmarks/plan_bench.py            # prints the section and writes it into BENCHMARKS.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402
from shards.gpus import GPUS, get_gpu  # noqa: E402
from costs.plan import MfuRule, PlanOptions, load_gpu_bench, parse_images, plan  # noqa: E402

MANIFEST = ROOT / "manifests" / "pixart-alpha.toml"
GPU_BENCH = ROOT / "benchmarks" / "results" / "gpu_bench_run1.json"
PAPER_DAYS = {"align-sam-256": 672, "aesthetic-256": 416, "aesthetic-512": 320, "aesthetic-1024": 160}
PAPER_TOTAL, PAPER_IMAGENET = 1656, 88
FLAT = "0.21"
STATED = "0.21,1024=0.07"  # the assumption the note states: 21%, and 7% for the 4,096-token 1024 px stage
IMAGES = "sam=10M,aesthetic=14M"


def train_days(mfu: str) -> tuple[dict[str, float], dict]:
    res = plan(MANIFEST, PlanOptions(gpu="V100", mfu=MfuRule.parse(mfu)))
    return {r["name"]: r["gpu_days"] for r in res["rows"] if r["step"] == "train"}, res


def anchor_table() -> tuple[str, dict]:
    flat, res = train_days(FLAT)
    stated, _ = train_days(STATED)
    peak_day = get_gpu("V100").peak_flops * 86400
    lines = ["| stage | paper V100-days | PFLOP (model) | MFU reproducing it exactly | attention share of FLOPs | "
             f"plan, flat MFU {float(FLAT):.0%} | error | plan, stated MFU | error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    exact = {}
    for r in (r for r in res["rows"] if r["step"] == "train"):
        name = r["name"]
        exact[name] = r["flops"] / (peak_day * PAPER_DAYS[name])
        lines.append(f"| {name} | {PAPER_DAYS[name]} | {r['flops'] / 1e15:,.0f} | {exact[name]:.1%} | {attention_share(r['name']):.0%} | "
                     f"{flat[name]:,.0f} | {flat[name] / PAPER_DAYS[name] - 1:+.0%} | {stated[name]:,.0f} | {stated[name] / PAPER_DAYS[name] - 1:+.0%} |")
    four = sum(PAPER_DAYS.values())
    f_tot, s_tot = sum(flat.values()), sum(stated.values())
    lines.append(f"| **four stages** | {four:,} | | {sum(r['flops'] for r in res['rows']) / (peak_day * four):.1%} | | {f_tot:,.0f} | "
                 f"{f_tot / four - 1:+.0%} | {s_tot:,.0f} | {s_tot / four - 1:+.0%} |")
    lines.append(f"| **paper total** (with the {PAPER_IMAGENET}-day ImageNet stage) | {PAPER_TOTAL:,} | | | | {f_tot:,.0f} | "
                 f"{f_tot / PAPER_TOTAL - 1:+.0%} | {s_tot:,.0f} | {s_tot / PAPER_TOTAL - 1:+.0%} |")
    return "\n".join(lines), {"exact": exact, "flat": flat, "stated": stated}


def attention_share(stage: str) -> float:
    """Share of a stage's model FLOPs in attention scores and weighted sums (T^2 and T x caption terms)."""
    from t2i.manifest import load_manifest
    from t2i.models import get_preset

    cfg = next(s.config for s in load_manifest(MANIFEST).stages if s.config.name == stage)
    h, t, c = get_preset(cfg.preset).hidden, (cfg.resolution // 16) ** 2, cfg.max_tokens
    dense = t * 14 * h * h + c * 2 * h * h
    attn = 2 * t * t * h + 2 * t * c * h
    return attn / (dense + attn)


def gpu_table() -> str:
    bench = load_gpu_bench(GPU_BENCH)
    lines = ["| GPU | training GPU-days | captioning + features GPU-days | total GPU-days | MWh (x PUE 1.2) | tCO2e (475 g/kWh) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in GPUS:
        res = plan(MANIFEST, PlanOptions(gpu=name, images=parse_images(IMAGES), gpu_bench=bench))
        t = res["totals"]
        lines.append(f"| {name} | {t['train_gpu_days']:,.0f} | {t['gpu_days'] - t['train_gpu_days']:,.0f} | {t['gpu_days']:,.0f} | "
                     f"{t['kwh'] / 1000:,.1f} | {t['kg_co2e'] / 1000:,.1f} |")
    return "\n".join(lines)


def body() -> str:
    table, d = anchor_table()
    e = d["exact"]
    return f"""`benchmarks/plan_bench.py` plans `manifests/pixart-alpha.toml` (the paper's batch sizes, steps and GPU counts)
on V100 (125 TFLOP/s fp16 peak) and compares it with the paper's stage table (RECIPE.md). FLOPs are model FLOPs
(`t2i.models.flops_per_image`: 3 x the forward matmuls, attention included); GPU-days = FLOPs / (peak x MFU).

{table}

**Stated assumption: MFU 21% on V100, and 7% for the 1024 px stage** (`--mfu {STATED}`). With it the four stages
land within {max(abs(d['stated'][k] / PAPER_DAYS[k] - 1) for k in PAPER_DAYS):.0%} of the paper each (the Must show asks ±35%), and together at
{sum(d['stated'].values()):,.0f} V100-days against the paper's {sum(PAPER_DAYS.values()):,} for the same four stages
({sum(d['stated'].values()) / sum(PAPER_DAYS.values()) - 1:+.0%}; ±25% asked). The paper's {PAPER_TOTAL:,} total adds its {PAPER_IMAGENET}-day ImageNet stage,
which this recipe replaces by `import-dit`, so it is not the anchor. Be clear about what that shows: 21% is the paper's own
aggregate (its four stages' FLOPs over their 1,568 V100-days: 20.8%), so the sum agreeing is nearly by
construction; the test is the spread per stage. One number covers three stages (the two 256 px stages within
3%, the 512 px stage within 31%), but the 7% is fitted to the one stage it prices. **No single MFU reproduces every stage**: with a flat 21% the total
is within 6% and three stages within 31%, but the 1024 px stage comes out at a third of the paper's 160 days.

What the exact MFUs say about the original training:

- The 256 px stages ran at {e['align-sam-256']:.0%} and {e['aesthetic-256']:.0%} MFU, the 512 px stage at {e['aesthetic-512']:.0%}: ordinary
  for fp16 on V100 with gradient checkpointing (recomputing the forward costs a third more FLOPs than
  the model FLOPs counted here, so the hardware ran at ~{e['aesthetic-256'] * 4 / 3:.0%}-{e['aesthetic-512'] * 4 / 3:.0%}). This toolkit's
  trainer measures 34% MFU on an H100 (bf16, FlashAttention-class SDPA, regional compile; 25% with checkpointing).
- The 1024 px stage ran at {e['aesthetic-1024']:.0%}: three to four times less work per GPU-second. At 4,096 tokens a third of its
  FLOPs are attention (4% at 256 px), and V100 has no FlashAttention: the 4,096 x 4,096 score matrices go
  through memory. With a batch of 12 per GPU and multi-aspect buckets it also had the least work per step to
  hide that. Or the 160 days count more than these 16K steps; the paper does not say.
- The paper's 675 A100-days is its 1,656 V100-days x 125/312 peak ratio (= {PAPER_TOTAL * 125 / 312:.0f}) plus a little: a conversion,
  not a measurement.

The same recipe on today's GPUs, captioning (LLaVA-7B, all 24M images) and features included (`--images {IMAGES}`),
at this trainer's measured H100 efficiencies (`--gpu-bench benchmarks/results/gpu_bench_run1.json`: 34.5%
MFU at 256 px, 33.5% at 512 px, also used at 1024 px; captioner 5.4 img/s on H100 scaled by memory bandwidth,
a transformers-backend run at 128 new tokens, so its cost is likely too high for vLLM and too low for longer
captions) applied to every GPU as they are, V100 included (at the paper's own 21% its training is the 1,549
days above); energy at board power:

{gpu_table()}
"""


def main() -> None:
    text = body()
    print(text)
    write_section("plan", text)


if __name__ == "__main__":
    main()
