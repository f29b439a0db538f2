"""Export a training checkpoint as a diffusers pipeline folder.

`PixArtAlphaPipeline.from_pretrained(dir)` loads it and samples from it with no t2i code at all.
The learned null caption cannot be folded into the pipeline (its unconditional branch is T5("")
by construction), so it is saved next to the pipeline as `null_caption.safetensors` and
`load_exported(dir)` / `t2i.sample.generate(pipe, null, prompts)` pass it as
`negative_prompt_embeds`; that reproduces the guidance the model was trained for. A plain
`pipe(prompt)` call still works but guides against T5("") instead (documented in
`T2I_EXPORT.md` inside the folder).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shards.errors import UserError

NULL_FILE = "null_caption.safetensors"

NOTE = """# Exported by t2i-data

A `PixArtAlphaPipeline` folder: `PixArtAlphaPipeline.from_pretrained(this_dir)`.
Pass `use_resolution_binning=False` unless the sample size is 32/64/128, and `clean_caption=False`
if bs4/ftfy are not installed.

Classifier-free guidance: this model was trained with a learned null caption
(`null_caption.safetensors`, key `null_caption`, shape [tokens, channels], mask all ones).
To guide exactly as in training, pass it as the negative branch:

```python
from t2i.export import load_exported
from t2i.sample import generate
pipe, null = load_exported(this_dir)
images = generate(pipe, null, ["a red circle on the left"])
```

or without t2i: encode the prompt with `pipe.encode_prompt(..., do_classifier_free_guidance=False)`
and call `pipe(prompt_embeds=..., prompt_attention_mask=..., negative_prompt=None,
negative_prompt_embeds=null[None].expand(B, -1, -1), negative_prompt_attention_mask=ones)`.
A plain `pipe(prompt)` guides against T5("") instead, which the model never saw in training.
"""


@dataclass
class ExportConfig:
    """Every setting of the export command (its flags map 1:1)."""

    checkpoint: Path  # a run directory or a checkpoints/step-* directory
    out: Path  # a new directory for the diffusers pipeline
    which: str = "ema"  # ema | model weights
    vae: str | None = None  # default: the VAE the features used
    text_encoder: str | None = None


def export_command(cfg: ExportConfig) -> str:
    """`t2i-data export`: the pipeline folder, then what the command prints (where it went)."""
    return f"wrote {export(cfg.checkpoint, cfg.out, which=cfg.which, vae=cfg.vae, text_encoder=cfg.text_encoder)}"


def export(checkpoint: str | Path, out_dir: str | Path, which: str = ExportConfig.which, vae: str | None = None,
           text_encoder: str | None = None) -> Path:
    """Write the pipeline folder (atomically: temp dir, then rename). Returns `out_dir`."""
    from safetensors.torch import save_file

    from t2i.pipeline import pipeline_from_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: pass a new --out directory")
    pipe, null = pipeline_from_checkpoint(checkpoint, vae, text_encoder, which, device="cpu")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    save_file({"null_caption": null.float().contiguous().cpu()}, tmp / NULL_FILE)
    (tmp / "T2I_EXPORT.md").write_text(NOTE)
    (tmp / "t2i_export.json").write_text(json.dumps({"checkpoint": str(checkpoint), "weights": which}, indent=2))
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir


def load_exported(path: str | Path, device: str | None = None, dtype=None):
    """(PixArtAlphaPipeline, null_caption or None) from an exported folder; `dtype` default float32."""
    import torch
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import load_file

    dtype = dtype or torch.float32

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json): run `t2i-data export` first")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = PixArtAlphaPipeline.from_pretrained(path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    null = load_file(str(path / NULL_FILE))["null_caption"].to(device, dtype) if (path / NULL_FILE).exists() else None
    return pipe, null
