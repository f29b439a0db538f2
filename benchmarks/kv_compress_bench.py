"""KV token compression (PixArt-Sigma's lever, t2i.sigma) against full self-attention: seconds for
the transformer's forward and backward on one image, as a ratio, beside the ratio of training FLOPs
`plan` prices for the same model (t2i.models.flops_per_image with kv_compress).

The two ways are the same model (same seed, same weights) with and without the compression on
every block, at stride 2; interleaved round by round, each figure a median. The share of the step
that attention takes grows with the token count, so the saving grows with the latent side.

    python benchmarks/kv_compress_bench.py [--rounds 4] [--threads 1]   # writes the "kv_compress_bench" section of BENCHMARKS.md
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
from t2i.models import build_transformer, flops_per_image, get_preset  # noqa: E402
from t2i.sigma import attach_kv_compress  # noqa: E402

PRESET, TOKENS, CHANNELS, RATIO = "PixArt-S/2", 16, 64, 2
NOTE = (" plan counts matmul FLOPs only; on CPU attention's softmax and its T x T score matrix cost more than their FLOPs,"
        " so the measured saving is larger than plan's: no GPU figure yet.")
LATENTS = (64, 96)  # 512 px (1024 patch tokens) and 768 px (2304) with an 8x VAE


def make(latent: int, kv: bool):
    torch.manual_seed(0)
    tr = build_transformer(PRESET, latent, CHANNELS, use_additional_conditions=False)
    torch.nn.init.normal_(tr.proj_out.weight, std=0.02)  # a trained model's: gradients reach every block
    if kv:
        attach_kv_compress(tr, RATIO)
    return tr


def step(tr, latent: int) -> float:
    """Seconds for one forward and backward on one image."""
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, TOKENS, CHANNELS, generator=g)
    t = time.perf_counter()
    out = tr(x, encoder_hidden_states=c, timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
             return_dict=False)[0]
    out.square().mean().backward()
    tr.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def measure(latent: int, rounds: int) -> dict[str, float]:
    ways = {"full": make(latent, False), "kv": make(latent, True)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(rounds + 1):
        for name in (list(ways) if r % 2 else list(ways)[::-1]):
            sec = step(ways[name], latent)
            if r:  # round 0: warm-up
                times[name].append(sec)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="timed steps per way (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    depth = get_preset(PRESET).depth
    lines = ["| latent (patch tokens) | full attention | KV r2, every block | time ratio (lower: KV is faster) | plan's FLOPs ratio |",
             "|---|---|---|---|---|"]
    for latent in LATENTS:
        res = measure(latent, args.rounds)
        plan = flops_per_image(PRESET, (latent, latent), TOKENS, CHANNELS, kv_compress=RATIO, kv_blocks=depth) / \
            flops_per_image(PRESET, (latent, latent), TOKENS, CHANNELS)
        lines.append(f"| {latent} ({(latent // 2) ** 2}) | {res['full']:.2f} s | {res['kv']:.2f} s | **{res['kv'] / res['full']:.2f}** | {plan:.2f} |")
        print(lines[-1], flush=True)
    body = (f"{PRESET}, one image, forward + backward of the transformer ({TOKENS} caption tokens of {CHANNELS} channels), "
            f"fp32 on CPU at {args.threads} torch thread(s), median of {args.rounds} interleaved rounds. A ratio below 1 means "
            "KV compression is faster; plan's FLOPs ratio is what `t2i-data plan` prices for the same change:"
            f"{NOTE}\n\n"
            + "\n".join(lines) + f"\n\nMachine: {machine()}. {load_note(load)}")
    print(write_section("kv_compress_bench", body))


if __name__ == "__main__":
    main()
