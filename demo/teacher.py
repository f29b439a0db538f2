"""The demo's frozen REPA teacher, as REPA uses DINOv2: fitted once, offline, and shipped.

REPA (t2i.repa) aligns an early block of the trained model with the patch features of a frozen
vision encoder that never saw the training images (DINOv2 never saw SAM). The demo's teacher is
a tiny transformers `Dinov2Model` (hidden 64, 3 layers, patch 4, 32 px: an 8x8 patch grid, the
demo's 8x8 token grid) fitted on GENERIC flat graphics, never the world's scenes:
tiny.pixart.labelled_shape_images (discs, boxes, triangles, plus signs of random colour, size and
place on plain, tilted or grainy backgrounds, a quarter blurred and grainy), with a dense
objective: each patch token predicts the shape kind of each of its 4x4 pixels (a linear head,
dropped after fitting). So its patch features know which shape covers each place.

    python -m demo.teacher  # ~15 min on one CPU thread; --out demo/assets/tiny_teacher --steps 12000 --batch 32

writes a model directory any `teacher` setting takes (t2i.teacher: AutoModel + AutoImageProcessor,
1 prefix token, 8x8 patch tokens of 64 channels) and `fit.json`: how it was made and its pixel
accuracy on held-out graphics.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHIPPED_TEACHER = Path(__file__).resolve().parent / "assets" / "tiny_teacher"
SIZE = 32  # the demo's image side (t2i_resolution)
PATCH = 4  # 32 / 4 = 8 patches a side: the demo's token grid (16x16 latents, patch 2)
KINDS = 5  # background + tiny.world.SHAPES
EVAL_SEED = 987_654  # held-out graphics for the accuracy in fit.json (training draws from seed * 100003 + step)
LR = 1e-3  # one-cycle peak, a tenth of the steps warming up
STEPS = 12_000  # a ViT learns shape kinds late: at 400 steps (the first teacher) it told them at chance (0.32),
# it starts after ~2000 steps (0.47), reaches 0.73 by 4500 and 0.83 at 12000 (2026-12-05, this model, lr 1e-3)
WARMUP = 0.1
BACKGROUND_WEIGHT = 0.2  # the loss weight of background pixels (~88% of them): without it the kinds are learnt later


def build_teacher(hidden: int = 64, layers: int = 3, heads: int = 2, seed: int = 0):
    """A fresh tiny Dinov2Model on SIZE px images with PATCH px patches (CLS + 8x8 patch tokens)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                       patch_size=PATCH, image_size=SIZE, layerscale_value=1.0)
    return Dinov2Model(cfg)


def pixel_logits(model, head, x):
    """(B, KINDS, SIZE, SIZE) per-pixel logits: each patch token's head output, laid out as its
    PATCH x PATCH pixels."""
    grid = SIZE // PATCH
    tokens = model(pixel_values=x).last_hidden_state[:, 1:]  # the CLS token is not a place
    out = head(tokens).view(-1, grid, grid, KINDS, PATCH, PATCH)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(-1, KINDS, SIZE, SIZE)


def fit_teacher(steps: int = STEPS, batch: int = 32, lr: float = LR, seed: int = 0, progress: bool = False):
    """(teacher, head, log): the teacher fitted `steps` AdamW steps (one-cycle lr) on fresh batches
    of labelled generic graphics, per-pixel cross-entropy (background weighted BACKGROUND_WEIGHT);
    log rows every 100 steps."""
    import torch
    from rich.progress import track

    from tiny.pixart import labelled_shape_images

    model = build_teacher(seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, KINDS * PATCH * PATCH)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=WARMUP)
    weight = torch.tensor([BACKGROUND_WEIGHT] + [1.0] * (KINDS - 1))
    log = []
    for step in track(range(steps), description="fitting the tiny teacher", disable=not progress):
        x, y = labelled_shape_images(batch, SIZE, seed=seed * 100003 + step)
        logits = pixel_logits(model, head, x)
        loss = torch.nn.functional.cross_entropy(logits, y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            accuracy = (logits.argmax(1) == y).float().mean().item()
            log.append({"step": step, "loss": round(loss.item(), 4), "pixel_accuracy": round(accuracy, 4)})
    return model.eval(), head.eval(), log


def held_out_accuracy(model, head, n: int = 512) -> dict[str, float]:
    """Per-pixel accuracy on `n` held-out graphics: overall (mostly background), on shape pixels,
    shape against background, and the kind on the shape pixels found as shapes (chance: 0.25)."""
    import torch

    from tiny.pixart import labelled_shape_images

    x, y = labelled_shape_images(n, SIZE, seed=EVAL_SEED)
    with torch.no_grad():
        pred = pixel_logits(model, head, x).argmax(1)
    shape, right = y > 0, pred == y
    figures = {"pixel_accuracy": right, "shape_pixel_accuracy": right[shape], "shape_vs_background": (pred > 0) == shape,
               "kind_of_found_shapes": right[shape & (pred > 0)]}
    return {k: round(v.float().mean().item(), 4) for k, v in figures.items()}


def save_teacher(model, out: Path) -> None:
    """The model and the image processor the teacher path reads (32 px, inputs scaled to [-1, 1]
    as in fitting: mean 0.5, std 0.5)."""
    from transformers import BitImageProcessor

    model.save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True).save_pretrained(out)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(SHIPPED_TEACHER))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, head, log = fit_teacher(args.steps, args.batch, seed=args.seed, progress=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    save_teacher(model, out)
    record = {"made_by": "python -m demo.teacher", "model": "transformers Dinov2Model", "hidden": model.config.hidden_size,
              "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads, "patch": PATCH,
              "image_size": SIZE, "grid": [SIZE // PATCH] * 2, "prefix_tokens": 1,
              "data": "tiny.pixart.labelled_shape_images: generic flat graphics (no world scenes), fresh each step",
              "objective": "per-pixel shape kind (background + 4 kinds) from each patch token by a linear head (dropped), "
                           f"cross-entropy with background weighted {BACKGROUND_WEIGHT}",
              "steps": args.steps, "batch": args.batch, "lr": f"one-cycle, max {LR:g}, {WARMUP:.0%} warm-up, AdamW", "seed": args.seed, "threads": args.threads,
              "seconds": round(seconds, 1), "held_out": held_out_accuracy(model, head), "log": log}
    (out / "fit.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record["held_out"]), f"{seconds:.0f} s")


if __name__ == "__main__":
    main()
