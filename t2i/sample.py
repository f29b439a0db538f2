"""Sampling: checkpoint (or exported folder) + prompts -> images / PNG grid, through the conditioning
the checkpoint was trained with (t2i.conditioning): a text-to-image checkpoint through diffusers'
PixArtAlphaPipeline with DPM-Solver++ (20 steps, guidance 4.5 by default; t2i.pipeline), a
class-cond one through its DiT, the prompts naming classes (t2i.class_cond).

Classifier-free guidance uses the LEARNED null caption as the unconditional branch (passed as
`negative_prompt_embeds`), exactly as in training; the stock pipeline would encode "" with T5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shards.errors import UserError
from t2i.kinds import checkpoint_conditioning
from t2i.pipeline import generate, image_grid, pipeline_from_checkpoint

__all__ = ["sample", "generate", "image_grid", "pipeline_from_checkpoint"]  # the sampling entry points


def sample(checkpoint: str | Path, prompts: Sequence[str], out_png: str | Path, steps: int = 20, guidance: float = 4.5,
           seed: int = 0, vae: str | None = None, text_encoder: str | None = None, which: str = "ema", cols: int | None = None) -> Path:
    """Checkpoint + prompts -> one PNG grid (row-major in prompt order). Returns the PNG path.
    A class-cond checkpoint (t2i.class_cond) takes class labels as prompts."""
    if not prompts:
        raise UserError("no prompts given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    kind = checkpoint_conditioning(checkpoint)
    images = kind.images(checkpoint, list(prompts), steps=steps, guidance=guidance, seed=seed, vae=vae, text_encoder=text_encoder,
                         which=which)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols).save(out_png)
    return out_png
