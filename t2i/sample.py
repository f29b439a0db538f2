"""Sampling: checkpoint (or exported folder) + prompts -> images / PNG grid, through the conditioning
the checkpoint was trained with (t2i.conditioning): a text-to-image checkpoint through diffusers'
PixArtAlphaPipeline (PixArtSigmaPipeline for a Sigma stage, t2i.sigma) with DPM-Solver++ (20
steps, guidance 4.5 by default; t2i.pipeline), a class-cond one through its DiT, the prompts
naming classes (t2i.class_cond).

Classifier-free guidance uses the LEARNED null caption as the unconditional branch (passed as
`negative_prompt_embeds`), exactly as in training; the stock pipeline would encode "" with T5.

The model code is imported when a sample is drawn, so `SampleConfig` reads without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from shards.checks import SEED, Range, check_output_file, check_ranges, read_text_input
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
        """`prompt`, then the non-empty lines of `prompts_file` (UTF-8 text)."""
        prompts = list(self.prompt)
        if self.prompts_file:
            text = read_text_input(self.prompts_file, "--prompts-file", "pass a UTF-8 text file with one prompt per line")
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        return prompts

    def validate(self) -> None:
        """A UserError for a setting out of range, or an output that cannot be written (before any model loads)."""
        check_ranges(self, SAMPLER_RANGES)
        check_weights(self.which)
        check_output_file(self.out)
        check_overrides(self.vae, self.text_encoder)


# the sampler's settings (sample, eval): their ranges
SAMPLER_RANGES = {"steps": Range(1, 1000), "guidance": Range(0, 100), "seed": SEED}
WEIGHTS = ("ema", "model")


def check_weights(which: str) -> None:
    """`--weights` names one of a checkpoint's weight sets."""
    if which not in WEIGHTS:
        raise UserError(f"--weights {which!r} is not one of {', '.join(WEIGHTS)}: pick one")


def check_overrides(vae: str | None, text_encoder: str | None) -> None:
    """The --vae / --text-encoder given in place of the checkpoint's, checked before any model
    code loads (shards.hub: a hub id in seconds, a missing or empty folder)."""
    from shards.hub import check_model

    if vae:
        check_model(vae, "the VAE", "--vae")
    if text_encoder:
        check_model(text_encoder, "the text encoder", "--text-encoder")


def sample_command(cfg: SampleConfig) -> str:
    """`t2i-data sample`: the grid, then what the command prints (where it went)."""
    cfg.validate()
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
    from t2i.recovery import usable_checkpoint

    if not prompts:
        raise UserError("no prompts given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    check_weights(which)
    ck = usable_checkpoint(checkpoint, which)  # verified first: a damaged file is one line, not a traceback
    kind = checkpoint_conditioning(ck)
    images = kind.images(ck, list(prompts), steps=steps, guidance=guidance, seed=seed, vae=vae, text_encoder=text_encoder,
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
