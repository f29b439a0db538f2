"""Checkpoints in safetensors: model (+ null caption), EMA, optimizer, scheduler, RNG, data position.

Layout of `<run>/checkpoints/step-0000100/`:
  transformer/config.json   the PixArtTransformer2DModel config
  model.safetensors         trained weights (transformer.* and null_caption)
  ema.safetensors           EMA weights, same keys
  optimizer.safetensors     AdamW state tensors; param groups in the metadata
  rng.safetensors           torch CPU (and CUDA) generator states
  trainer_state.json        step, data position, scheduler state, config
  checksums.json            SHA-256 of every file above, taken when it was written
A checkpoint is written into a temp directory and renamed into place, then `latest` is updated,
so a crash never leaves a half-written checkpoint that looks complete. The checksums let resume,
sample, export and eval catch a changed byte in a file of the right size (t2i.recovery).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from shards import fs
from shards.errors import UserError
from t2i.sigma import attach_kv_compress, pop_kv_config

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"  # relative path -> SHA-256 of each file, written with the checkpoint
DAMAGED_PREFIX = "damaged-"  # a checkpoint set aside because it does not verify (t2i.recovery)
STEP_RE = re.compile(r"^step-(?P<step>\d+)$")


def _contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_tensors(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimizer state dict (whole tensors) as flat safetensors tensors + JSON metadata."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.contiguous().cpu()
            else:
                scalars[f"state.{pid}.{k}"] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def optimizer_from_tensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, Any]] = {}
    for k, v in list(tensors.items()) + list(json.loads(meta["scalars"]).items()):
        _, pid, name = k.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": json.loads(meta["param_groups"])}


def save_checkpoint(run_dir: Path, step: int, transformer, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], trainer_state: dict[str, Any], keep: int = 3,
                    extras: Callable[[Path], None] | None = None) -> Path:
    """Write one checkpoint atomically and keep the newest `keep` of this run's timeline. The
    states are whole (unsharded) tensors, whatever the run's sharding, so any run shape can
    resume from it. Order: files (fsynced) in a temp dir -> rename into place -> `latest` ->
    rotation, so `latest` never names a directory that is not complete. `extras(dir)` writes
    more files into the checkpoint before it is committed (a class-cond stage's DiT)."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / step_name(step)
    tmp = ckdir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    transformer.save_config(tmp / "transformer")
    save_file(_contig(model_state), tmp / "model.safetensors")
    save_file(_contig(ema_state), tmp / "ema.safetensors")
    ot, meta = optimizer_to_tensors(optimizer_state)
    save_file(ot, tmp / "optimizer.safetensors", metadata=meta)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, default=str))
    if extras is not None:
        extras(tmp)
    write_checksums(tmp)
    _fsync_tree(tmp)
    if final.exists():  # the same step again (a resumed run): set the old one aside, never leave a gap
        old = ckdir / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fs.write_text(ckdir / LATEST, final.name)
    rotate(ckdir, step, keep)
    return final


def rotate(ckdir: Path, current_step: int, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, by step number, among those no newer than
    `current_step`: a checkpoint from past this run's step (an older run's, set aside by a
    fallback) is never what this run wrote, and is left alone. Checkpoints set aside as damaged
    (`damaged-step-*`) count too, each older than a good one of its step, so their space is
    freed as the run goes on."""
    if keep <= 0:
        return
    mine = sorted((s, not p.name.startswith(DAMAGED_PREFIX), p.name) for p in ckdir.iterdir()
                  if (s := parse_step(p.name.removeprefix(DAMAGED_PREFIX))) is not None and s <= current_step)
    for _, _, name in mine[:-keep]:
        shutil.rmtree(ckdir / name, ignore_errors=True)


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def parse_step(name: str) -> int | None:
    """The step of a `step-0000100` directory name, or None for anything else."""
    m = STEP_RE.match(name)
    return int(m["step"]) if m else None


def write_checksums(ck: Path) -> None:
    """Record the SHA-256 of every file of checkpoint directory `ck` in its checksums.json."""
    sums = {p.relative_to(ck).as_posix(): fs.sha256(p) for p in sorted(ck.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    (ck / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's `checkpoints/step-*` directories, newest step first."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(s, p) for p in ckdir.iterdir() if (s := parse_step(p.name)) is not None and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory itself, or the latest one of a run directory, or None. `latest`
    is trusted only when it names a checkpoint that exists; otherwise the directories are scanned."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    ptr = path / "checkpoints" / LATEST
    if ptr.is_file():
        ck = path / "checkpoints" / ptr.read_text().strip()
        if parse_step(ck.name) is not None and (ck / "model.safetensors").exists():
            return ck
    return next((ck for ck in checkpoint_dirs(path) if (ck / "model.safetensors").exists()), None)


def require_checkpoint(path: str | Path) -> Path:
    ck = latest_checkpoint(path)
    if ck is None:
        raise UserError(f"no checkpoint at {path}: pass a run directory of `t2i-data train` or one of its checkpoints/step-* directories")
    return ck


def load_matching(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, allow_missing: tuple[str, ...] = ()) -> None:
    """load_state_dict that names every missing, unexpected or wrongly shaped key in a UserError."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(allow_missing)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
        raise UserError(f"{what} does not fit this model ({'; '.join(parts)}): use the same preset, caption channels and settings it was trained with")
    module.load_state_dict(sd, strict=False)


def load_weights(ck: Path, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(Path(ck) / f"{which}.safetensors"))


def load_transformer(ck: Path, which: str = "ema", adapter: str = "merge", **config_overrides):
    """(PixArtTransformer2DModel, null_caption) from a checkpoint; `which` is "ema" or "model".
    A LoRA checkpoint's adapter goes onto its run's frozen base (t2i.lora), merged into the
    weights (`adapter="merge"`), or kept as peft layers (`"keep"`)."""
    ck = require_checkpoint(ck)
    state_file = ck / TRAINER_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("lora", {}).get("lora_rank"):
        from t2i import lora

        model, null = _load_transformer(lora.base_of(ck, state), "model", **config_overrides)
        lora.attach(model, state["lora"], load_weights(ck, which), f"checkpoint {ck}")
        return (lora.merge(model) if adapter == "merge" else model).eval(), null
    return _load_transformer(ck, which, **config_overrides)


def _load_transformer(ck: Path, which: str, **config_overrides):
    from diffusers import PixArtTransformer2DModel

    cfg = PixArtTransformer2DModel.load_config(ck / "transformer")
    if cfg.get("_class_name") == "DiTTransformer2DModel":
        raise UserError(f"{ck} is a class-conditional DiT (a class-cond stage), not a PixArt model: "
                        "import it into PixArt (`t2i-data import-dit`, or init = \"previous\" / \"dit:PATH\" in the next stage)")
    cfg.update(config_overrides)
    kv_ratio, kv_layers = pop_kv_config(cfg)
    model = PixArtTransformer2DModel.from_config(cfg)
    attach_kv_compress(model, kv_ratio, kv_layers)  # t2i.sigma: the blocks' compression, before their weights load
    sd = load_weights(ck, which)
    inner = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
    # a stage moving to 1024 px gains size/aspect embedders that the checkpoint lacks
    new = ("adaln_single.emb.resolution_embedder", "adaln_single.emb.aspect_ratio_embedder") if config_overrides else ()
    load_matching(model, inner, f"checkpoint {ck}", allow_missing=new)
    return model.eval(), sd["null_caption"]


def null_tokens_of(ck: Path) -> int:
    """How many tokens of a checkpoint's null caption are attended (0: all; t2i.models.null_mask)."""
    state = Path(ck) / TRAINER_STATE
    return int(json.loads(state.read_text()).get("null_tokens", 0)) if state.is_file() else 0
