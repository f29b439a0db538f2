"""Export a training checkpoint as a diffusers pipeline folder that carries its own settings.

`PixArtAlphaPipeline.from_pretrained(dir)` (`PixArtSigmaPipeline` for a PixArt-Sigma stage) loads it and samples from it with no t2i code at all.
The folder holds what reproducing our sampler needs, read from it alone:
- the scheduler of the objective the model was trained with (`scheduler/`: DPM-Solver++ on the
  DDPM schedule with its prediction type, or its flow-matching form with the training shift);
- `null_caption.safetensors`: the learned null caption, the unconditional branch the model was
  trained with (the stock pipeline's is T5(""), which it never saw; it cannot be folded in);
- `t2i_export.json`: the caption token length it was trained with (`max_sequence_length`: the
  pipeline's default of 120 is not it), the objective, the sampler defaults (steps, guidance,
  size), and `clean_caption: false`: t2i encodes captions as written, in training and sampling,
  so prompts must not go through the pipeline's lower-casing `clean_caption` either.
`T2I_EXPORT.md` in the folder gives the recipe for a client with diffusers alone; it reproduces
`t2i.sample.generate` (tests/test_export_client.py). A plain `pipe(prompt)` call still works but
guides against T5("") at 120 tokens, with cleaned prompts: not what the model was trained for.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.checks import check_output_dir
from shards.errors import UserError

NULL_FILE = "null_caption.safetensors"
SETTINGS_FILE = "t2i_export.json"

NOTE = """# Exported by t2i-data

A `PixArtAlphaPipeline` folder: `PixArtAlphaPipeline.from_pretrained(this_folder)`. Its settings are
in `t2i_export.json`: the caption token length the model was trained with (`max_sequence_length`),
its objective, the sampler defaults; the scheduler in `scheduler/` is the one it was trained for.

Sample exactly as t2i does (`t2i.sample.generate`), with diffusers alone: the prompts encoded at the
trained token length, as written (`clean_caption=False`: t2i never lower-cases or cleans captions,
in training or sampling), and the learned null caption (`null_caption.safetensors`, shape
[tokens, channels], mask all ones, or its first `null_tokens` tokens when t2i_export.json says so)
as the unconditional branch of classifier-free guidance. Run
from inside this folder (or set `folder`):

```python
import json

import torch
from diffusers import PixArtAlphaPipeline
from safetensors.torch import load_file

folder = "."
settings = json.load(open(f"{folder}/t2i_export.json"))
pipe = PixArtAlphaPipeline.from_pretrained(folder)
null = load_file(f"{folder}/null_caption.safetensors")["null_caption"]
tokens = settings["max_sequence_length"]


def sample(prompts, seed=0, output_type="pil"):
    emb, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=tokens,
                                         clean_caption=False)
    neg = null.to(emb.dtype)[None].expand(len(prompts), -1, -1)
    neg_mask = torch.ones(neg.shape[:2], dtype=mask.dtype)
    if settings.get("null_tokens"):  # a null caption from the empty prompt: only its first tokens attended
        neg_mask[:, settings["null_tokens"]:] = 0
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask,
                negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask,
                num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                height=settings["height"], width=settings["width"], use_resolution_binning=False,
                max_sequence_length=tokens, clean_caption=False, output_type=output_type,
                generator=torch.Generator("cpu").manual_seed(seed)).images


images = sample(["a red circle on the left"])
```

With t2i installed the same is `pipe, null = t2i.export.load_exported(folder)` and
`t2i.sample.generate(pipe, null, prompts)`. A plain `pipe(prompt)` guides against T5("") at 120
tokens with cleaned prompts instead, which the model never saw in training: expect worse samples.
"""


LORA_NOTE = """
## The LoRA adapter (`transformer_lora/`)

This folder's transformer is the frozen base; the trained adapter is a peft adapter folder
(`adapter_config.json` + `adapter_model.safetensors`). diffusers 0.42 has no LoRA loader for
PixArt (`PixArtTransformer2DModel` is not a `PeftAdapterMixin`), so load it with peft onto the
pipeline's transformer, before sampling:

```python
from peft import PeftModel

pipe.transformer = PeftModel.from_pretrained(pipe.transformer, f"{folder}/transformer_lora")
pipe.transformer = pipe.transformer.merge_and_unload()  # optional: fold it in (same samples to ~1e-6)
```
"""


@dataclass
class ExportConfig:
    """Every setting of the export command (its flags map 1:1)."""

    checkpoint: Path  # a run directory or a checkpoints/step-* directory
    out: Path  # a new directory for the diffusers pipeline
    which: str = "ema"  # ema | model weights
    vae: str | None = None  # default: the VAE the features used
    text_encoder: str | None = None
    lora: bool = False  # a LoRA checkpoint: the base pipeline + the adapter as a peft folder (transformer_lora/)
    merge: bool = False  # a LoRA checkpoint: the adapter merged into the transformer (also what a plain export does)

    def validate(self) -> None:
        """A UserError for unknown weights or an output that cannot be written (before any model loads)."""
        from t2i.sample import check_overrides, check_weights

        check_weights(self.which)
        check_overrides(self.vae, self.text_encoder)
        if self.lora and self.merge:
            raise UserError("--lora and --merge together: pick one (--lora: base + adapter folder; --merge: merged weights)")
        check_output_dir(self.out.parent if str(self.out.parent) else Path("."), shown=self.out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UserError(f"--out {self.out} exists and is not an empty directory: pass a new --out directory")


def export_command(cfg: ExportConfig) -> str:
    """`t2i-data export`: the pipeline folder, then what the command prints (where it went)."""
    cfg.validate()
    lora = "adapter" if cfg.lora else "merge" if cfg.merge else None
    return f"wrote {export(cfg.checkpoint, cfg.out, which=cfg.which, vae=cfg.vae, text_encoder=cfg.text_encoder, lora=lora)}"


def export(checkpoint: str | Path, out_dir: str | Path, which: str = ExportConfig.which, vae: str | None = None,
           text_encoder: str | None = None, lora: str | None = None) -> Path:
    """Write the pipeline folder (atomically: temp dir, then rename). Returns `out_dir`. A LoRA
    checkpoint's adapter is merged into the transformer (`lora` None or "merge"), or, with
    `lora="adapter"`, written beside the base pipeline as a peft adapter folder."""
    from safetensors.torch import save_file

    from t2i import lora as adapters
    from t2i.pipeline import pipeline_from_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty: pass a new --out directory")
    check_exportable(checkpoint, which)
    settings = lora_settings(checkpoint, which, lora)
    pipe, null = pipeline_from_checkpoint(checkpoint, vae, text_encoder, which, device="cpu",
                                          adapter="keep" if lora == "adapter" else "merge")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if lora == "adapter":
        adapters.save_adapter(pipe.transformer, settings, tmp / adapters.ADAPTER_DIR)
        adapters.unload(pipe.transformer)  # the pipeline itself: the frozen base
    pipe.save_pretrained(tmp)
    save_file({"null_caption": null.float().contiguous().cpu()}, tmp / NULL_FILE)
    (tmp / "T2I_EXPORT.md").write_text(note_for(pipe) + (LORA_NOTE if lora == "adapter" else ""))
    recorded = export_settings(checkpoint, which, pipe, null)
    if settings:
        recorded["lora"] = {**settings, "adapter": adapters.ADAPTER_DIR if lora == "adapter" else None,
                            "merged": lora != "adapter"}
    (tmp / SETTINGS_FILE).write_text(json.dumps(recorded, indent=2))
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir


def note_for(pipe) -> str:
    """T2I_EXPORT.md for this pipeline's class and its own default prompt length (alpha 120, Sigma 300)."""
    import inspect

    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return NOTE.replace("PixArtAlphaPipeline", type(pipe).__name__).replace('T5("") at 120', f'T5("") at {default}')


def check_exportable(checkpoint: str | Path, which: str) -> None:
    """One line, before any model loads, for a checkpoint whose model a diffusers pipeline cannot
    hold (KV compression, t2i.sigma)."""
    from t2i.recovery import usable_checkpoint
    from t2i.sigma import check_exportable as check_config

    ck = usable_checkpoint(checkpoint, which)
    check_config(json.loads((ck / "transformer" / "config.json").read_text()), f"checkpoint {ck}")


def lora_settings(checkpoint: str | Path, which: str, lora: str | None) -> dict[str, Any]:
    """The LoRA settings of the checkpoint an export reads ({} without LoRA); --lora or --merge
    on a checkpoint without an adapter is one line."""
    from t2i.recovery import usable_checkpoint

    ck = usable_checkpoint(checkpoint, which)
    settings = json.loads((ck / "trainer_state.json").read_text()).get("lora") or {}
    if lora and not settings.get("lora_rank"):
        raise UserError(f"--{'lora' if lora == 'adapter' else 'merge'}: checkpoint {ck} has no LoRA adapter (a full fine-tune): "
                        "export it without --lora/--merge")
    return settings if settings.get("lora_rank") else {}


def export_settings(checkpoint: str | Path, which: str, pipe, null) -> dict[str, Any]:
    """What t2i_export.json records: where the weights came from, and every setting a client
    needs to sample as t2i does (the token length, the objective, the sampler's defaults)."""
    from t2i.objective import objective_of_state
    from t2i.recovery import usable_checkpoint
    from t2i.sample import SampleConfig
    from t2i.text_cond import TextConditioning

    ck = usable_checkpoint(checkpoint, which)
    state = json.loads((ck / "trainer_state.json").read_text())
    objective = objective_of_state(state)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return {"checkpoint": str(Path(ck).resolve()), "step": state.get("step"), "weights": which,
            "max_sequence_length": int(null.shape[0]), "clean_caption": False,
            "objective": {"kind": objective.kind, **objective.settings()}, "scheduler": type(pipe.scheduler).__name__,
            "null_caption": NULL_FILE, "null_tokens": int(getattr(pipe, "t2i_null_tokens", 0)), "num_inference_steps": SampleConfig.steps, "guidance_scale": TextConditioning.guidance,
            "height": size, "width": size}  # fmt: skip


def load_exported(path: str | Path, device: str | None = None, dtype=None):
    """(its PixArtAlphaPipeline or PixArtSigmaPipeline, null_caption or None) from an exported
    folder; `dtype` default float32."""
    import torch

    from shards.hub import load_pretrained, load_weights_file
    from t2i.sigma import pipeline_class

    dtype = dtype or torch.float32

    path = Path(path)
    if not (path / "model_index.json").exists():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json): run `t2i-data export` first")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family = "sigma" if json.loads((path / "model_index.json").read_text()).get("_class_name") == "PixArtSigmaPipeline" else "alpha"
    pipe = load_pretrained(pipeline_class(family).from_pretrained, str(path), "exported pipeline", "export folder", dtype=dtype)
    pipe.to(device).set_progress_bar_config(disable=True)
    null = None
    if (path / NULL_FILE).exists():
        null = load_weights_file(path / NULL_FILE, "null caption", "export folder")["null_caption"].to(device, dtype)
    if (path / SETTINGS_FILE).exists():
        pipe.t2i_null_tokens = int(json.loads((path / SETTINGS_FILE).read_text()).get("null_tokens", 0))
    return pipe, null
