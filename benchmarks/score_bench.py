"""Scoring speed on CPU: images/s per scorer, batched (the score job's way) vs one image at a
time (the naive way: a model call per image), in one run.

Both ways call curate.scorers.score_batch, the per-batch function the score job runs: batched
with --batch-size rows per call and the next batch decoded in threads while this one is
scored; naive with one row per call, decoding inline. Images: demo-world scenes rendered at
--size px and saved as JPEG. `clip` is a CLIP with the ViT-B/32 architecture (random weights:
speed does not depend on them; ViT-L/14, the default model, is ~4.5x the compute per image);
`aesthetic` runs the LAION v2 head on its 512-d embeddings (timed on top of clip); `nsfw` is
NudeNet's bundled 320n ONNX detector; `lang` is py3langid on the captions; `image` the
resolution/blur/JPEG/size statistics.

    python benchmarks/score_bench.py [--images N] [--size PX] [--batch-size B]   # writes "score_bench"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section  # noqa: E402
from curate.scorers import Scorers, decode_ahead, score_batch  # noqa: E402


NOTE = '\n\n`image` and `lang` make no model call to amortise, so batching gains nothing there (below 1x: a batch of decoded images is held before its statistics run, and `lang` pays the batch bookkeeping); the job batches for the model scorers. Three other jobs shared the 2 cores during the run: single figures are noisy. Command: `python benchmarks/score_bench.py`.'


def make_rows(folder: Path, n: int, size: int) -> list[dict]:
    from tiny.clip import world_caption
    from tiny.world import render, sample_scenes

    rows = []
    for i, scene in enumerate(sample_scenes(n, seed=0, split="any")):
        path = folder / f"{i}.jpg"
        render(scene, size).save(path, quality=90)
        rows.append({"key": str(i), "source": str(path), "caption": world_caption(scene)})
    return rows


def vit_b32_clip(folder: Path, corpus: list[str]) -> str:
    """A CLIP directory with ViT-B/32's architecture and random weights (no download)."""
    from tiny.clip import build_tiny_clip, save_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    _, tokenizer, _ = build_tiny_clip(corpus)
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "eos_token_id": 3, "pad_token_id": 0, "bos_token_id": 2},
                        vision_config={"patch_size": 32}, projection_dim=512)  # fmt: skip
    return str(save_clip(CLIPModel(config), tokenizer, CLIPImageProcessor(), folder / "clip-b32"))


def batched(rows: list[dict], scorers: Scorers, batch_size: int) -> float:
    """Images/s of the score job's way: batches, the next one decoded in threads meanwhile."""
    start = time.perf_counter()
    with ThreadPoolExecutor(scorers.workers) as pool:
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        pending = decode_ahead(pool, batches[0], scorers)
        for i, batch in enumerate(batches):
            loaded = pending()
            if i + 1 < len(batches):
                pending = decode_ahead(pool, batches[i + 1], scorers)
            score_batch(batch, scorers, loaded)
    return len(rows) / (time.perf_counter() - start)


def one_by_one(rows: list[dict], scorers: Scorers) -> float:
    start = time.perf_counter()
    for row in rows:
        score_batch([row], scorers)
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=256, help="image side in px")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--scorers", default="image,lang,clip,aesthetic,nsfw", help="which scorers to time")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    import torch

    from shards.models.aesthetic import AestheticMLP

    lines = ["| scorer | batched (images/s) | one at a time (images/s) | batched / one at a time |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = make_rows(Path(tmp), args.images, args.size)
        clip_dir = vit_b32_clip(Path(tmp), [r["caption"] for r in rows])
        for path in Path(tmp).glob("*.jpg"):  # both ways read from the page cache
            path.read_bytes()
        for name in args.scorers.split(","):
            names = ["clip", "aesthetic"] if name == "aesthetic" else [name]
            scorers = Scorers.load(names, clip_dir, None, aesthetic_head=AestheticMLP(512) if name == "aesthetic" else None)
            score_batch(rows[:2], scorers)  # warm-up: first-call allocations, ONNX session init
            fast, slow = batched(rows, scorers, args.batch_size), one_by_one(rows, scorers)
            lines.append(f"| {name}{' (+clip)' if name == 'aesthetic' else ''} | {fast:.1f} | {slow:.1f} | **{fast / slow:.2f}x** |")
            print(lines[-1], flush=True)
    body = (
        f"{args.images} demo-world JPEGs of {args.size}x{args.size} px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, decoding threads 2; both columns run `curate.scorers.score_batch` "
        "(decode included). Ratio > 1: batching is faster. `clip` = ViT-B/32 architecture with random weights "
        "(ViT-L/14, the default, costs ~4.5x per image); `aesthetic` = clip + the LAION v2 head.\n\n" + "\n".join(lines) + NOTE
    )
    print(body)
    if not args.no_write:
        print(f"wrote {write_section('score_bench', body)}")


if __name__ == "__main__":
    main()
