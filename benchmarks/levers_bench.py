"""Per-step cost of each training lever (issue 29) against the plain step, on CPU, in one run:
min-SNR-gamma, flow matching (uniform; logit-normal + shift + cosmap), token dropping (TREAD
routing at 25 / 50 / 75%), REPA (lambda 0.5, its projector on the tokens of block depth / 3, the
stored teacher tokens of the case's teacher width), and the validation loss's forward per
held-out sample.

A step is what the trainer runs per optimizer step (t2i.train: make_inputs, TrainStep.micro,
TrainStep.update with AdamW + EMA) on random latents and captions of the right shapes, the model
built as train() builds it (t2i.routing.attach_routing for token dropping, t2i.repa.repa_terms
for REPA). The ways are
interleaved round by round (each round starting one way later), so a change of load hits them
all; each figure is a median.

    python benchmarks/levers_bench.py [--rounds 15]     # writes the "levers_bench" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import load_note, write_section  # noqa: E402
from t2i.models import PixArtWithNull, build_transformer, flops_per_image, get_preset  # noqa: E402
from t2i.noise import sample_keys  # noqa: E402
from t2i.objective import build_objective  # noqa: E402
from t2i.repa import projector_macs, projector_width, repa_terms  # noqa: E402
from t2i.routing import attach_routing  # noqa: E402
from t2i.train import TrainConfig, TrainStep, make_accelerator, make_inputs, setup_optimization  # noqa: E402
from t2i.train.validate import val_inputs  # noqa: E402

WAYS = {
    "plain (DDPM, epsilon, IDDPM loss)": {},
    "plain again (the noise gauge)": {},
    "min-SNR-5": {"loss_weighting": "min_snr"},
    "flow, uniform": {"objective": "flow"},
    "flow, logit-normal, shift 3, cosmap": {"objective": "flow", "timestep_density": "logit_normal", "flow_shift": 3.0,
                                           "loss_weighting": "cosmap"},
    "token_drop 0.25": {"token_drop": 0.25},
    "token_drop 0.5": {"token_drop": 0.5},
    "token_drop 0.75": {"token_drop": 0.75},
    "REPA 0.5": {"teacher": "stored", "repa_weight": 0.5},
}
# (preset, what it stands for, latent side, batch, caption tokens, caption channels, rounds per --rounds)
CASES = [("PixArt-mini/2", "the demo's --full model at 32 px (its VAE: latent 16x16, 64 tokens)", 16, 32, 32, 32, 4),
         ("PixArt-S/2", "256 px (latent 32x32: 256 tokens), T5-XXL width", 32, 4, 120, 4096, 1)]
# REPA's stored teacher tokens per case: the demo's teacher (64 wide), DINOv2-B's (768) on the 16x16 grid
TEACHER_DIM = {"PixArt-mini/2": 64, "PixArt-S/2": 768}


def make_way(preset: str, latent: int, tokens: int, channels: int, settings: dict):
    """(TrainStep, TrainConfig) of one way, built as t2i.train.start_run builds a stage."""
    cfg = TrainConfig(preset=preset, max_tokens=tokens, lr=1e-4, warmup_steps=1, grad_clip=1.0, **settings)
    objective = build_objective(vars(cfg))
    torch.manual_seed(0)
    model = PixArtWithNull(build_transformer(preset, latent, channels, learned_sigma=objective.learned_sigma), tokens)
    drop = attach_routing(model, cfg.token_drop, cfg.token_drop_start, cfg.token_drop_end)
    terms = repa_terms(vars(cfg), model, TEACHER_DIM[preset])
    accel = make_accelerator(cfg)
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    return TrainStep.prepare(cfg, accel, model, opt, sched, ema, objective, terms=terms, token_drop=drop), cfg


def batch_of(n: int, latent: int, tokens: int, channels: int, teacher_dim: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(n, 4, latent, latent, generator=g)
    grid = (latent // 2, latent // 2)  # the teacher's patch grid: the model's token grid (patch 2)
    return SimpleNamespace(latent_mean=mean, latent_std=torch.full_like(mean, 0.05), keys=[f"k{i}" for i in range(n)],
                           text=torch.randn(n, tokens, channels, generator=g), mask=torch.ones(n, tokens, dtype=torch.long),
                           height=8 * latent, width=8 * latent, teacher_grid=grid,
                           teacher=torch.randn(n, grid[0] * grid[1], teacher_dim, generator=g).half())


def one_step(stepper: TrainStep, cfg: TrainConfig, b, step: int) -> None:
    keys = sample_keys(0, 0, step, np.arange(len(b.keys)))
    inp = make_inputs(b, 0.18, stepper.objective, cfg.caption_dropout, keys, stepper.token_drop)
    inp["cond"] = {"captions": b.text, "caption_mask": b.mask}
    inp.update({term.name: term.inputs(b) for term in stepper.terms})
    stepper.micro(inp, size=(b.height, b.width))
    stepper.update()


def stepping(stepper: TrainStep, cfg: TrainConfig, b):
    """A function that runs the way's next step (each step its own noise keys)."""
    steps = itertools.count()
    return lambda: one_step(stepper, cfg, b, next(steps))


def one_validation(stepper: TrainStep, b) -> None:
    keys = sample_keys(9, 0, 0, np.arange(len(b.keys)))
    inp = val_inputs(b, 0.18, stepper.objective, keys, 0, 4)
    inp["cond"] = {"captions": b.text, "caption_mask": b.mask}
    stepper.evaluate(inp, size=(b.height, b.width))


def measure(case: tuple, rounds: int) -> dict[str, float]:
    """Median seconds per step of each way (and per validation forward, "validation"), interleaved."""
    preset, _, latent, batch, tokens, channels, _ = case
    b = batch_of(batch, latent, tokens, channels, TEACHER_DIM[preset])
    ways = {name: make_way(preset, latent, tokens, channels, s) for name, s in WAYS.items()}
    plain = ways[next(iter(WAYS))][0]
    runs = {name: stepping(st, cfg, b) for name, (st, cfg) in ways.items()}
    runs["validation (forward, 1 timestep)"] = lambda: one_validation(plain, b)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
        fn()
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # each round starts one way later: no way always first
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def flops_ratio(preset: str, latent: int, tokens: int, channels: int, settings: dict) -> float:
    """Training FLOPs per image of a way against the plain one (t2i.models.flops_per_image)."""
    depth, hidden = get_preset(preset).depth, get_preset(preset).hidden
    drop = settings.get("token_drop", 0.0)
    macs = projector_macs(hidden, projector_width(hidden), TEACHER_DIM[preset]) if settings.get("repa_weight") else 0
    plain = flops_per_image(preset, (latent, latent), tokens, channels)
    return flops_per_image(preset, (latent, latent), tokens, channels, token_drop=drop, routed_blocks=depth - 2,
                           token_macs=macs) / plain


def table(case: tuple, sec: dict[str, float]) -> list[str]:
    preset, what, latent, batch, tokens, channels, _ = case
    base = sec[next(iter(WAYS))]
    rows = []
    for name, s in sec.items():
        fl = f"{flops_ratio(preset, latent, tokens, channels, WAYS[name]):.2f}" if name in WAYS else "0.33"
        rows.append(f"| {preset} | {name} | {s * 1e3:.0f} ms | {s / base:.2f} | {fl} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per way (x4 for the small model; median reported)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0, started = os.getloadavg()[0], time.time()
    lines = []
    for case in CASES:
        sec = measure(case, args.rounds * case[-1])
        lines += table(case, sec)
        print("\n".join(table(case, sec)), flush=True)
    cases = "; ".join(f"{p}: {what}, batch {batch}, {tok} caption tokens of {ch} channels, median of {args.rounds * k} steps"
                      for p, what, _, batch, tok, ch, k in CASES)
    body = (
        "Seconds per optimizer step on CPU (one micro-batch: make_inputs, forward, loss, backward, clipping, AdamW, EMA), "
        "each lever alone against the plain step, the ways interleaved step by step (each round starting one way later), "
        f"{args.threads} torch threads. Cases: {cases}. Token dropping routes blocks [1, depth - 1) "
        "(the defaults token_drop_start = 1, token_drop_end = -1). REPA: lambda 0.5 on the output of block "
        "round(depth / 3) through REPA's projector (width min(2048, 4 x hidden)) against stored teacher tokens "
        f"({', '.join(f'{p}: {d} wide' for p, d in TEACHER_DIM.items())}) on the token grid; the teacher itself never "
        "runs in training (its cost is in `features`, priced by `plan`).\n\n"
        "**time ratio** = the way's seconds per step / the plain step's: below 1 is cheaper, above 1 dearer. "
        "**FLOPs ratio** = `t2i.models.flops_per_image` of the way / the plain step's (what `plan` prices). \"plain again\" is "
        "a second, identical plain way: its distance from 1 is the noise of this shared machine, so ratios within it of 1 "
        "(min-SNR and flow, which do the plain step's matmuls; flow's output has no variance half) mean no measurable cost. "
        "The validation "
        "row is one no-grad forward over the same batch at one timestep (`TrainStep.evaluate`; its FLOPs are the forward "
        "third of a step): a validation of N held-out samples at `val_timesteps` k costs about N k / batch of these.\n\n"
        "| model | way | seconds per step | time ratio | FLOPs ratio |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Whole run {time.time() - started:.0f} s. " + load_note(load0)
    )
    write_section("levers_bench", body)


if __name__ == "__main__":
    main()
