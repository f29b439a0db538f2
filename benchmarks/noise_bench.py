"""The trainer's per-sample noise inputs: batched (t2i.noise.sample_keys + t2i.train.make_inputs:
one SplitMix64 stream per sample, all samples in a few numpy array operations) vs the old way
(a SeedSequence seed and a torch.Generator per sample, four draws each), measured in one run,
alternating the two ways so a change of load hits both. Both give a sample the same noise on any
number of processes and after a resume; the unkeyed batched torch draws (which do not) are the floor.

    python benchmarks/noise_bench.py            # writes the "train noise inputs" section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
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
from t2i.diffusion import Diffusion  # noqa: E402
from t2i.noise import sample_keys  # noqa: E402
from t2i.train import make_inputs  # noqa: E402

# (model, setting, per-process micro-batch, latent shape)
CASES = [("PixArt-tiny/2", "16 px", 64, (4, 8, 8)), ("PixArt-S/2", "128 px", 8, (4, 16, 16)),
         ("PixArt-XL/2", "256 px", 32, (4, 32, 32)), ("PixArt-XL/2", "1024 px", 8, (4, 128, 128))]


def old_seeds(seed: int, epoch: int, batch_pos: int, positions) -> list[int]:
    """The old per-sample seeds (t2i.train.sample_seed before the batched draws)."""
    return [int(np.random.SeedSequence([seed, epoch, batch_pos, int(p)]).generate_state(1)[0]) for p in positions]


def old_make_inputs(b, scaling: float, num_timesteps: int, caption_dropout: float, seeds: list[int]) -> dict[str, torch.Tensor]:
    """The old make_inputs: each sample from its own torch.Generator."""
    x0, noise, t, drop = [], [], [], []
    shape = tuple(b.latent_mean.shape[1:])
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        x0.append(b.latent_mean[i].float() + b.latent_std[i].float() * torch.randn(shape, generator=g))
        noise.append(torch.randn(shape, generator=g))
        t.append(torch.randint(0, num_timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g) < caption_dropout)
    return {"x0": torch.stack(x0) * scaling, "noise": torch.stack(noise), "t": torch.cat(t), "drop": torch.cat(drop)}


def measure(batch: int, shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Median ms per micro-batch of each way, the ways interleaved round by round."""
    mean = torch.randn(batch, *shape)
    b = SimpleNamespace(latent_mean=mean, latent_std=torch.full_like(mean, 0.05), text=None, mask=None)
    positions = np.arange(batch)
    objective = Diffusion()
    ways = {
        "old": lambda: old_make_inputs(b, 0.18, 1000, 0.1, old_seeds(0, 0, 1, positions)),
        "new": lambda: make_inputs(b, 0.18, objective, 0.1, sample_keys(0, 0, 1, positions)),
        "floor": lambda: (b.latent_mean + b.latent_std * torch.randn_like(mean), torch.randn_like(mean),
                          torch.randint(0, 1000, (batch,)), torch.rand(batch) < 0.1),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn in ways.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="timed micro-batches per way and case (median reported)")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    torch.set_num_threads(1)
    rows = []
    for model, setting, batch, shape in CASES:
        rounds = max(10, min(args.rounds, args.rounds * 16384 // (batch * int(np.prod(shape)))))  # fewer for big latents
        ms = measure(batch, shape, rounds)
        rows.append(f"| {model} | {setting}, batch {batch}, latent {'x'.join(map(str, shape))} | {ms['old']:.2f} ms | "
                    f"{ms['new']:.2f} ms | {ms['old'] / ms['new']:.1f}x | {ms['floor']:.2f} ms | {rounds} |")
        print(rows[-1], flush=True)
    body = (
        "Per micro-batch, on the CPU where the trainer makes them (1 thread): the trainer's noise inputs (posterior draw, "
        "diffusion noise, timestep, caption-drop flag of every sample), each sample's drawn from its own key so that it "
        "gets the same noise on any number of processes and after a resume. **new**: one SplitMix64 stream per sample "
        "keyed by (seed, epoch, global batch, position), all samples at once in numpy, Box-Muller for the normals "
        "(`t2i.noise` + `t2i.train.make_inputs`). **old**: a SeedSequence seed and a `torch.Generator` per sample, four "
        "draws each (the trainer before this change, copied into the script). Ratio = old / new (above 1: new faster). "
        "**floor**: the same draws from torch's global generator, batched, with no per-sample reproducibility. Each "
        "figure is the median over `timed` micro-batches per way, the ways interleaved.\n\n"
        "| model | setting | old | new | ratio | floor | timed |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        + load_note(load0)
    )
    write_section("train noise inputs", body)


if __name__ == "__main__":
    main()
