"""LoRA adapters (peft) on a text-to-image stage's transformer: settings and their checks, adding
the adapter (everything else frozen), the frozen base a run keeps once (`<run>/lora_base/`),
loading an adapter from a checkpoint, merging it, and its diffusers/peft export form.

A LoRA run's checkpoints hold only the adapter's weights, EMA and optimizer state; the frozen
base (transformer + null caption) is written once per run, so sample/export/eval rebuild the model
as base + adapter (t2i.checkpoint.load_transformer)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.errors import UserError

VARIANTS = ("lora", "dora")  # dora: peft's weight-decomposed LoRA (use_dora)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection (self + cross)
BASE_DIR = "lora_base"  # <run>/lora_base/: transformer/config.json + model.safetensors of the frozen base
ADAPTER_DIR = "transformer_lora"  # export --lora: a peft adapter folder (adapter_config.json + adapter_model.safetensors)
SETTINGS = ("lora_rank", "lora_alpha", "lora_targets", "lora_variant")  # what a resume must keep


def parse_targets(value: Any) -> tuple[str, ...]:
    """Target module names from a TOML list, a comma-separated CLI string or a tuple."""
    if isinstance(value, str):
        value = value.split(",")
    out = tuple(str(v).strip() for v in value)
    if not out or any(not v for v in out):
        raise UserError(f"lora_targets {','.join(out)!r} has an empty name: list module names, e.g. {','.join(DEFAULT_TARGETS)}")
    return out


def settings_of(cfg: Any) -> dict[str, Any]:
    """The LoRA settings of a TrainConfig or a recorded config dict (lora_rank 0: off)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    rank = int(get("lora_rank", 0) or 0)
    if not rank:
        return {"lora_rank": 0}
    return {"lora_rank": rank, "lora_alpha": float(get("lora_alpha", 0) or rank), "lora_targets": list(parse_targets(get("lora_targets"))),
            "lora_variant": get("lora_variant", "lora")}


def check_settings(cfg: Any) -> None:
    """One line for a bad rank, alpha or variant, and for a stage kind LoRA does not adapt."""
    if cfg.lora_rank < 0:
        raise UserError(f"lora_rank must be >= 1 (0: LoRA off), got {cfg.lora_rank}: pick a rank such as 16")
    if not cfg.lora_rank:
        return
    if cfg.lora_alpha < 0:
        raise UserError(f"lora_alpha must be >= 0 (0: equal to lora_rank), got {cfg.lora_alpha}")
    if cfg.lora_variant not in VARIANTS:
        raise UserError(f"lora_variant {cfg.lora_variant!r} is not one of {', '.join(VARIANTS)}: pick one")
    if cfg.kind != "text-to-image":
        raise UserError(f"lora_rank {cfg.lora_rank} on a {cfg.kind} stage: LoRA adapts text-to-image stages; set lora_rank = 0 here")
    if cfg.fsdp:
        raise UserError("lora_rank with fsdp: a LoRA stage trains a few MB of adapter, shard nothing (drop --fsdp)")
    _peft()


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft, which is not installed: pip install peft (or lora_rank = 0)") from None
    return peft


def lora_config(settings: dict[str, Any]):
    """peft's LoraConfig of recorded settings (settings_of)."""
    return _peft().LoraConfig(r=settings["lora_rank"], lora_alpha=settings["lora_alpha"], target_modules=list(settings["lora_targets"]),
                              use_dora=settings["lora_variant"] == "dora", init_lora_weights=True)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(module: nn.Module, targets, where: str = "the model", any_block: bool = False) -> None:
    """One line naming the first target that is no Linear/Conv module of `module` (peft's match: the
    name or a dotted suffix of it). `any_block`: a block index in a target is checked against block 0
    (`module` is a shallow probe of the architecture, not the stage's model)."""
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for t in targets:
        probe = re.sub(r"transformer_blocks\.\d+", "transformer_blocks.0", t) if any_block else t
        if not any(_matches(n, probe) for n in names):
            leaves = sorted({n.split("transformer_blocks.0.", 1)[-1] for n in names if "transformer_blocks.0." in n})
            raise UserError(f"lora target {t!r} is no linear layer of {where}: name ones it has, e.g. {', '.join(leaves[:12])}")


def check_targets_early(cfg: Any) -> None:
    """Before any work: the targets against a probe of the PixArt architecture (built on the meta
    device, so free); the stage's own model is checked again when it is built."""
    if not cfg.lora_rank:
        return
    from t2i.models import Preset, build_transformer

    with torch.device("meta"):
        probe = build_transformer(Preset(depth=1, hidden=8, heads=1, patch=2), 4, 8, use_additional_conditions=False)
    check_targets(probe, parse_targets(cfg.lora_targets), "a PixArt transformer", any_block=True)


def add_lora(model: nn.Module, cfg: Any) -> None:
    """Inject the stage's adapter into `model.transformer` (a PixArtWithNull) and freeze every
    other parameter, the null caption included: only the adapter trains."""
    settings = settings_of(cfg)
    check_targets(model.transformer, settings["lora_targets"], f"init {cfg.init}")
    for p in model.parameters():
        p.requires_grad_(False)
    _peft().inject_adapter_in_model(lora_config(settings), model.transformer)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what trains: all parameters, or a LoRA stage's adapter alone."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_base(out: Path, model: nn.Module) -> Path:
    """Write the frozen base once per run (before the adapter goes in): `<out>/lora_base/` with the
    transformer's config and model.safetensors (transformer.* and null_caption), checksummed."""
    from safetensors.torch import save_file

    from t2i.checkpoint import write_checksums

    base = Path(out) / BASE_DIR
    tmp = base.with_name(f".{BASE_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.transformer.save_config(tmp / "transformer")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    write_checksums(tmp)
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    return base


def base_of(ck: Path, state: dict[str, Any]) -> Path:
    """The frozen base a LoRA checkpoint adapts: recorded in its trainer state, else its run's."""
    recorded = Path(state.get("lora_base") or "")
    for base in (recorded, Path(ck).resolve().parents[1] / BASE_DIR):
        if str(base) not in ("", ".") and (base / "model.safetensors").is_file():
            return base
    raise UserError(f"checkpoint {ck} is a LoRA adapter, but its base ({recorded or BASE_DIR}) is gone: "
                    f"copy the run's {BASE_DIR}/ folder next to its checkpoints/")


def attach(transformer: nn.Module, settings: dict[str, Any], weights: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Add the adapter of `settings` to `transformer` and load its weights (a checkpoint's keys:
    transformer.<module>.lora_*.default.weight); every adapter weight must be there."""
    _peft().inject_adapter_in_model(lora_config(settings), transformer)
    want = {n for n, _ in transformer.named_parameters() if ".lora_" in n}
    got = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
    if set(got) != want:
        missing, extra = sorted(want - set(got)), sorted(set(got) - want)
        raise UserError(f"{what} does not fit its LoRA settings (missing {missing[:3]}, unexpected {extra[:3]}): it is damaged "
                        "or from another run")
    transformer.load_state_dict(got, strict=False)
    return transformer


def merge(transformer: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (no peft left)."""
    return _replace_lora_layers(transformer, merge=True)


def unload(transformer: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the base model as it was."""
    return _replace_lora_layers(transformer, merge=False)


def _replace_lora_layers(transformer: nn.Module, merge: bool) -> nn.Module:
    from peft.tuners.lora import LoraLayer

    for name, m in list(transformer.named_modules()):
        if isinstance(m, LoraLayer):
            if merge:
                m.merge()
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, m.get_base_layer())
    return transformer


def adapter_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights as a peft adapter folder holds them (`base_model.model.<module>.lora_A.weight`)."""
    return {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in _peft().get_peft_model_state_dict(transformer).items()}


def save_adapter(transformer: nn.Module, settings: dict[str, Any], folder: Path) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(pipe.transformer, folder)` loads onto the pipeline's transformer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = lora_config(settings)
    config.save_pretrained(str(folder))
    save_file(adapter_state(transformer), folder / "adapter_model.safetensors")
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def attach_weights(model: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load a LoRA checkpoint's weights (the trained unit's keys) into `model`'s adapter; the keys
    must be exactly the adapter's."""
    want = {n for n, _ in trainable(model)}
    if set(weights) != want:
        missing, extra = sorted(want - set(weights)), sorted(set(weights) - want)
        raise UserError(f"{what} does not fit this LoRA stage (missing {missing[:3]}, unexpected {extra[:3]}): resume with "
                        "the settings it was trained with, or train into a new --out")
    model.load_state_dict(weights, strict=False)
