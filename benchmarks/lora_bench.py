"""A LoRA step against a full fine-tuning step (issue 31): seconds per optimizer step and peak
memory, as ratios, and what `plan` prices for the same stage (trainable parameters, AdamW bytes,
FLOPs).

A step is what the trainer runs per optimizer step (make_inputs, TrainStep.micro, TrainStep.update:
clipping, AdamW, EMA) on random latents and captions of the right shapes; the LoRA way's model is
built as t2i.train.start_run builds a LoRA stage (t2i.lora.add_lora: peft adapter on the attention
projections, everything else frozen; AdamW and EMA over the adapter alone). The two ways are
interleaved step by step, each figure a median.

Memory: on CUDA, torch.cuda.max_memory_allocated over a step (weights, gradients, AdamW, EMA,
activations). On CPU, where torch keeps no allocator statistics, the same sum counted exactly:
the bytes of the training state (weights, gradients of what trains, AdamW moments, EMA) plus the
activations autograd saves for the backward (distinct storages, through saved_tensors_hooks).

    python benchmarks/lora_bench.py [--rounds 8] [--rank 16]   # writes the "lora_bench" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import load_note, machine, write_section  # noqa: E402
from benchmarks.levers_bench import batch_of, one_step  # noqa: E402
from costs.plan import lora_stage_price  # noqa: E402
from t2i import lora  # noqa: E402
from t2i.models import PixArtWithNull, build_transformer  # noqa: E402
from t2i.objective import build_objective  # noqa: E402
from t2i.train import TrainConfig, TrainStep, make_accelerator, setup_optimization  # noqa: E402

# (preset, what it stands for, latent side, batch, caption tokens, caption channels)
CASES = [("PixArt-mini/2", "the demo's --full model at 32 px (latent 16x16, 64 tokens)", 16, 32, 32, 32),
         ("PixArt-S/2", "128 px (latent 16x16: 64 tokens), T5-XXL width", 16, 4, 120, 4096),
         ("PixArt-XL/2", "the paper's model at 256 px (a GPU case: --cases PixArt-XL/2)", 32, 2, 120, 4096)]


def make_way(preset: str, latent: int, tokens: int, channels: int, rank: int):
    """(TrainStep, TrainConfig) of a full (rank 0) or LoRA stage, built as start_run builds it."""
    cfg = TrainConfig(preset=preset, max_tokens=tokens, lr=1e-4, warmup_steps=1, grad_clip=1.0, lora_rank=rank)
    objective = build_objective(vars(cfg))
    torch.manual_seed(0)
    model = PixArtWithNull(build_transformer(preset, latent, channels, learned_sigma=objective.learned_sigma), tokens)
    torch.nn.init.normal_(model.transformer.proj_out.weight, std=0.02)  # a trained model's: gradients reach the blocks
    if rank:
        lora.add_lora(model, cfg)
    accel = make_accelerator(cfg)
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    return TrainStep.prepare(cfg, accel, model, opt, sched, ema, objective), cfg


def state_bytes(stepper: TrainStep) -> int:
    """Weights + gradients of what trains + AdamW moments + EMA, in bytes (after a step)."""
    weights = sum(p.numel() * p.element_size() for p in stepper.model.parameters())
    trained = sum(p.numel() * p.element_size() for p in stepper.params)
    moments = sum(v.numel() * v.element_size() for s in stepper.opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return weights + trained + moments + trained  # gradients and EMA: one copy each of what trains


def peak_bytes(stepper: TrainStep, cfg: TrainConfig, b) -> int:
    """Peak memory of one step: CUDA's allocator peak, or on CPU the state plus saved activations."""
    if stepper.accel.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        one_step(stepper, cfg, b, 99)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        one_step(stepper, cfg, b, 99)
    return state_bytes(stepper) + sum(seen.values())


def measure(case: tuple, rank: int, rounds: int) -> dict[str, dict[str, float]]:
    preset, _, latent, batch, tokens, channels = case
    b = batch_of(batch, latent, tokens, channels)
    ways = {"full": make_way(preset, latent, tokens, channels, 0), f"LoRA r{rank}": make_way(preset, latent, tokens, channels, rank)}
    out = {name: {"peak": float(peak_bytes(st, cfg, b)), "times": []} for name, (st, cfg) in ways.items()}
    names = list(ways)
    for r in range(rounds + 1):
        for name in names[r % 2:] + names[: r % 2]:
            st, cfg = ways[name]
            t = time.perf_counter()
            one_step(st, cfg, b, r)
            if st.accel.device.type == "cuda":
                torch.cuda.synchronize()
            if r:  # round 0: warm-up
                out[name]["times"].append(time.perf_counter() - t)
    return {k: {"sec": statistics.median(v["times"]), "peak": v["peak"]} for k, v in out.items()}


def rows(case: tuple, rank: int, res: dict) -> list[str]:
    preset, _, latent, _, tokens, channels = case
    full, lo = res["full"], res[f"LoRA r{rank}"]
    price = lora_stage_price(preset, latent * 8, rank, max_tokens=tokens, channels=channels)
    whole = lora_stage_price(preset, latent * 8, 0, max_tokens=tokens, channels=channels)
    return [f"| {preset} | {full['sec'] * 1e3:.0f} ms | {lo['sec'] * 1e3:.0f} ms | **{lo['sec'] / full['sec']:.2f}** | "
            f"{full['peak'] / 2**20:.0f} MiB | {lo['peak'] / 2**20:.0f} MiB | **{lo['peak'] / full['peak']:.2f}** | "
            f"{price['trainable_params'] / 1e6:.2f}M of {whole['trainable_params'] / 1e6:.1f}M | "
            f"{price['step_flops_per_image'] / whole['step_flops_per_image']:.2f} |"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per way (median reported)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="PixArt-mini/2,PixArt-S/2", help="presets of CASES to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0, started = os.getloadavg()[0], time.time()
    lines, cases = [], [c for c in CASES if c[0] in args.cases.split(",")]
    for case in cases:
        lines += rows(case, args.rank, measure(case, args.rank, args.rounds))
        print(lines[-1], flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    body = (
        f"A LoRA step (rank {args.rank}, alpha = rank, on every attention projection: attn1/attn2 to_q, to_k, to_v, "
        "to_out.0) against a full fine-tuning step of the same model and batch, fp32 on "
        f"{device} ({args.threads} torch threads on CPU), the two interleaved step by step, median of {args.rounds} steps. "
        f"Cases: {'; '.join(f'{p}: {w}, batch {bt}, {t} caption tokens of {c} channels' for p, w, _, bt, t, c in cases)}.\n\n"
        "**time ratio** and **memory ratio** = LoRA / full: below 1, LoRA is cheaper. Peak memory on CPU is counted, not "
        "sampled: weights + gradients of what trains + AdamW moments + EMA + the activations autograd saves (CUDA: the "
        "allocator's peak). **FLOPs ratio** is what `plan` prices (`costs.plan.lora_stage_price`: no frozen weight "
        "gradients, about 2/3 of a full step, plus the adapter's matmuls).\n\n"
        "| model | full step | LoRA step | time ratio | full peak | LoRA peak | memory ratio | trainable | FLOPs ratio (plan) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Whole run {time.time() - started:.0f} s. " + load_note(load0)
    )
    write_section("lora_bench", body, where=None if device == "cpu" else f"{torch.cuda.get_device_name()} ({machine()})")


if __name__ == "__main__":
    main()
