"""The demo's frozen VAE, as PixArt-alpha uses SD's: fitted once, offline, and shipped.

Fitting a VAE good enough to keep 32 px shapes legible takes ~20 CPU-minutes, twice the
demo's budget, so the weights live in `demo/assets/tiny_vae/` and this module made them:

    python -m demo.vae --out demo/assets/tiny_vae --steps 3000

It fits `tiny.pixart.build_tiny_vae(data="shapes")` on generic flat graphics (discs, boxes,
triangles, plus signs of random colour, size and place; never the world's own scenes), then
measures the ceiling it puts on the demo: the world's judge on VAE round trips of world images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHIPPED_VAE = Path(__file__).resolve().parent / "assets" / "tiny_vae"
SIZE = 32


def round_trip_accuracy(vae_dir: str | Path, n: int = 96, seed: int = 5, size: int = SIZE) -> dict[str, float]:
    """Judge accuracy (colour, position, shape, all three) on decode(encode(x)) of `n` world
    images at `size` px: no generator can beat it."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from tiny import judge, world as W

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    scenes = W.sample_scenes(n, seed, "any")
    x = torch.tensor(np.stack([np.asarray(W.render(s, size), np.float32) / 127.5 - 1 for s in scenes])).permute(0, 3, 1, 2)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    images = [Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for r in rec]
    score = judge.score(list(zip(scenes, images)), attributes=("color", "position", "shape"))
    return {a: score[a]["accuracy"] for a in ("color", "position", "shape", "all")}


def main() -> None:
    import torch

    from tiny.pixart import build_tiny_vae

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(SHIPPED_VAE))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build_tiny_vae(args.out, fit_steps=args.steps, size=SIZE, data="shapes", progress=True)
    acc = round_trip_accuracy(args.out)
    (Path(args.out) / "round_trip.json").write_text(json.dumps(acc, indent=1))
    print(json.dumps(acc))


if __name__ == "__main__":
    main()
