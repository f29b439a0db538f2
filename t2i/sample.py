"""Sampling: checkpoint (or exported folder) + prompts -> images / PNG grid, through the conditioning
the checkpoint was trained with (t2i.conditioning): a text-to-image checkpoint through diffusers'
PixArtAlphaPipeline with DPM-Solver++ (20 steps, guidance 4.5 by default; t2i.pipeline), a
class-cond one through its DiT, the prompts naming classes (t2i.class_cond).

Classifier-free guidance uses the LEARNED null caption as the unconditional branch (passed as
`negative_prompt_embeds`), exactly as in training; the stock pipeline would encode "" with T5.

The model code is imported when a sample is drawn, so `SampleConfig` reads without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shards.errors import UserError

__all__ = ["SampleConfig", "sample", "sample_command", "generate", "image_grid", "pipeline_from_checkpoint"]
_FROM_PIPELINE = ("generate", "image_grid", "pipeline_from_checkpoint")  # the sampling entry points, t2i.pipeline's


@dataclass
class SampleConfig:
    """Every setting of the sample command (its flags map 1:1): the checkpoint, the prompts
    (`prompt`, plus the lines of `prompts_file`), the PNG grid and the sampler."""

    checkpoint: Path  # a run directory, a checkpoints/step-* directory or an exported folder
    prompt: Sequence[str] = ()
    prompts_file: Path | None = None  # one prompt per line
    out: Path = Path("samples.png")
    steps: int = 20  # DPM-Solver++ steps
    guidance: float = 4.5  # classifier-free guidance scale
    seed: int = 0
    which: str = "ema"  # ema | model weights
    vae: str | None = None  # default: the VAE the features used
    text_encoder: str | None = None

    def prompts(self) -> list[str]:
        """`prompt`, then the non-empty lines of `prompts_file`."""
        prompts = list(self.prompt)
        if self.prompts_file:
            if not self.prompts_file.exists():
                raise UserError(f"prompts file {self.prompts_file} not found: pass an existing text file")
            prompts += [line.strip() for line in self.prompts_file.read_text().splitlines() if line.strip()]
        return prompts


def sample_command(cfg: SampleConfig) -> str:
    """`t2i-data sample`: the grid, then what the command prints (where it went)."""
    path = sample(cfg.checkpoint, cfg.prompts(), cfg.out, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed,
                  vae=cfg.vae, text_encoder=cfg.text_encoder, which=cfg.which)  # fmt: skip
    return f"wrote {path}"


def sample(checkpoint: str | Path, prompts: Sequence[str], out_png: str | Path, steps: int = SampleConfig.steps,
           guidance: float = SampleConfig.guidance, seed: int = SampleConfig.seed, vae: str | None = None,
           text_encoder: str | None = None, which: str = SampleConfig.which, cols: int | None = None) -> Path:
    """Checkpoint + prompts -> one PNG grid (row-major in prompt order). Returns the PNG path.
    A class-cond checkpoint (t2i.class_cond) takes class labels as prompts."""
    from t2i.kinds import checkpoint_conditioning
    from t2i.pipeline import image_grid

    if not prompts:
        raise UserError("no prompts given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    kind = checkpoint_conditioning(checkpoint)
    images = kind.images(checkpoint, list(prompts), steps=steps, guidance=guidance, seed=seed, vae=vae, text_encoder=text_encoder,
                         which=which)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols).save(out_png)
    return out_png


def __getattr__(name: str) -> Any:
    """t2i.pipeline's sampling entry points, imported (with torch) when first asked for."""
    if name not in _FROM_PIPELINE:
        raise AttributeError(f"module 't2i.sample' has no attribute {name!r}")
    from t2i import pipeline

    return getattr(pipeline, name)
