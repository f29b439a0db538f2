"""The new scorers' speed on CPU (issue 34): images/s batched (the score job's way) against one
image at a time (a model call per image), in one run, through score_bench's two ways (both call
curate.scorers.score_batch, decoding included).

- `phash`: the 64-bit DCT pHash (curate.phash, numpy; no model);
- `watermark`: the watermark head on the CLIP image embedding, timed with its CLIP (ViT-B/32
  architecture, random weights, as score_bench's `clip`);
- `captions`: the CLIP score of every caption field, long captions in 77-token windows (each row
  has a ~150-token dense caption: 3 windows, a short caption and an alt-text), with its CLIP;
- `text`: the text detector (curate.text), random weights: a TextNet at a 256 px input, and the
  transformers path with a tiny PP-OCRv5 mobile detector (tiny.ocr; images at their own size);

    nice python benchmarks/curate_scorers_bench.py [--images N] [--size PX] [--batch-size B]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import load_note, write_section  # noqa: E402
from benchmarks.score_bench import batched, make_rows, one_by_one, vit_b32_clip  # noqa: E402
from curate.scorers import ModelRefs, Scorers  # noqa: E402


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--only-text", action="store_true", help="time only the text scorer (print; BENCHMARKS.md left alone)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on an oversubscribed machine, no thread waits on a descheduled one)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    from curate.watermark import WatermarkHead, save_watermark_head
    from tiny.clip import long_caption
    from tiny.ocr import build_tiny_ppocr_detector
    from tiny.world import sample_scenes

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = make_rows(tmp, a.images, a.size)
        rng = np.random.default_rng(0)
        for row, scene in zip(rows, sample_scenes(a.images, seed=0, split="any")):
            row.update(caption=long_caption(scene, rng, tokens=150), caption_short=f"a {scene.color} {scene.shape}", alt_text="a photo")
        clip = vit_b32_clip(tmp, [r["caption"] for r in rows])
        save_watermark_head(WatermarkHead(512), tmp / "wm.safetensors")
        refs = ModelRefs(watermark=str(tmp / "wm.safetensors"))
        text = {"text (TextNet 256 px)": _textnet(tmp / "text.safetensors"), "text (tiny PP-OCRv5 det)": str(build_tiny_ppocr_detector(tmp / "ppocr"))}
        table = ["| scorer | batched (images/s) | one at a time (images/s) | batched / one at a time |", "|---|---|---|---|"]
        ways = [("phash", ["phash"]), ("watermark (+clip)", ["clip", "watermark"]), ("captions (+clip)", ["clip", "captions"])]
        ways = [w for w in ways if not a.only_text] + [(label, ["text"]) for label in text]
        for label, names in ways:
            refs = ModelRefs(watermark=refs.watermark, text_detector=text.get(label))
            scorers = Scorers.load(names, clip, None, refs=refs, workers=2)
            one_by_one(rows[:4], scorers)  # warm-up
            b, o = batched(rows, scorers, a.batch_size), one_by_one(rows, scorers)
            table.append(f"| {label} | {b:.1f} | {o:.1f} | **{b / o:.2f}x** |")
            print(table[-1], flush=True)
    body = (f"{a.images} demo-world JPEGs of {a.size}x{a.size} px, batch {a.batch_size}, {a.threads} torch thread(s), 2 decoding threads; both "
            "columns run `curate.scorers.score_batch` (decode included). Ratio > 1: batching is faster. CLIP = ViT-B/32 "
            "architecture, random weights; each row has a ~150-token caption (3 windows of 77), a short caption and an "
            "alt-text. `watermark` costs its CLIP's image embedding (the head is one small MLP a batch). `text`: the detector "
            "alone (no recogniser), random weights: a TextNet (curate.text) at a 256 px input, and a tiny PP-OCRv5 mobile "
            "detector through transformers (images of one processed size share a forward pass).\n\n"
            + "\n".join(table) + "\n\n" + load_note(load) + f" Command: `nice python benchmarks/curate_scorers_bench.py --images {a.images} --threads {a.threads}`.")
    if not a.only_text:
        print(write_section("curate_scorers_bench", body))


def _textnet(path: Path) -> str:
    """A TextNet at a 256 px input, random weights (its cost is its architecture's)."""
    import torch

    from curate.text import TextNet, save_text_detector

    torch.manual_seed(0)
    return str(save_text_detector(TextNet(256), path))


if __name__ == "__main__":
    main()
