"""Opening a stage's inputs and resuming it: the features directory made for its settings
(`find_features`), and the checkpoint a `--resume` continues from (`load_resume_weights`, then
`restore_training_state`), refused when its global batch or caption settings differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.errors import UserError
from t2i import checkpoint as ckpt
from t2i import lora
from t2i import recovery
from t2i import sharding
from t2i import sigma
from t2i.caption_fields import DEFAULT_FIELDS, normalised, parse_fields, parse_weights
from t2i.feature_config import check_model_digests
from t2i.features import FeatureConfig, features_dir
from t2i.objective import check_resume_objective
from t2i.repa import check_resume_repa
from t2i.train.config import TrainConfig


FEATURE_IDENTITY = FeatureConfig.IDENTITY
FEATURE_DTYPES = ("text_dtype", "latent_dtype")  # how features store what trains: fixed for a run's life


def _made_with(made: dict[str, Any], key: str) -> Any:
    """A setting of a features directory's config.json, as FeatureConfig holds it (directories
    made before caption_fields existed hold the default field)."""
    if key == "caption_fields":
        return tuple(made.get(key) or DEFAULT_FIELDS)
    if key in ("teacher", "teacher_dtype"):  # made before the option: no teacher
        return made.get(key, FeatureConfig.teacher if key == "teacher" else FeatureConfig.teacher_dtype)
    return made.get(key)


def find_features(path: Path, cfg: TrainConfig) -> Path:
    """The features directory for cfg's settings: `path` itself when it is one (made with these
    settings), else `path/<cache key>/`."""
    want = cfg.feature_config()
    own = path / "config.json"
    if own.is_file():
        made = json.loads(own.read_text())
        if made.get("cache_key") != want.cache_key():
            differ = [f"{k} {_made_with(made, k)!r} (this stage: {getattr(want, k)!r})" for k in FEATURE_IDENTITY
                      if _made_with(made, k) != getattr(want, k)]
            raise UserError(f"{path} holds features made with other settings ({'; '.join(differ) or 'another version'}): "
                            f"train with the settings they were made with, or pass --shards to make features for these")
        check_model_digests(path, made, want.model_digests())
        return path
    fdir = features_dir(path, want)
    if not (fdir / "config.json").is_file():
        raise UserError(f"no features for this stage's settings in {path} (looked for {fdir.name}/): run `t2i-data features "
                        f"--out {path}` with the same --vae/--text-encoder/--resolution/--max-tokens/dtypes, or pass --shards")
    check_model_digests(fdir, json.loads((fdir / "config.json").read_text()), want.model_digests())
    return fdir


def failed_images(fdir: Path) -> int:
    """Images the features job could not read or decode (recorded in its manifest), so not trained on."""
    manifest = fdir / "manifest.json"
    return int(json.loads(manifest.read_text()).get("failed", 0)) if manifest.is_file() else 0


def load_resume_weights(out: Path, model, global_batch: int, world: int, local_batch: int,
                        set_aside: bool = True, cfg: TrainConfig | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of `out` that verifies (a damaged newer one is set aside, with a
    warning, when `set_aside`) and its trainer state, its model weights loaded into `model`.
    With `cfg`, a run whose caption fields or weights, objective settings, REPA settings or
    held-out keys differ from the checkpoint's is refused."""
    ck = recovery.resumable_checkpoint(out, set_aside=set_aside)
    if ck is None:
        raise UserError(f"--resume but no checkpoint in {out}: drop --resume to start fresh")
    st = json.loads((ck / "trainer_state.json").read_text())
    saved_global = st.get("global_batch", st["config"]["batch_size"] * st.get("world_size", 1))
    if saved_global != global_batch:
        raise UserError(f"checkpoint {ck} was trained with a global batch of {saved_global} ({st.get('world_size', 1)} processes); "
                        f"this run has {global_batch} ({world} x {local_batch}): set global_batch = {saved_global} "
                        f"(a multiple of the number of processes) to resume on {world} processes")
    if cfg is not None:
        check_caption_settings(ck, st, cfg)
        check_resume_objective(ck, st.get("config", {}), vars(cfg))
        check_resume_repa(ck, st.get("config", {}), vars(cfg))
        check_holdout(ck, st.get("config", {}), cfg)
        check_lora(ck, st.get("config", {}), cfg)
        sigma.check_resume(ck, st.get("config", {}), cfg)
        check_feature_dtypes(ck, st.get("config", {}), cfg)
    weights = ckpt.load_weights(ck, "model")
    if cfg is not None and cfg.lora_rank:  # the adapter alone: into the adapter's parameters
        lora.attach_weights(model, weights, f"checkpoint {ck}")
    else:
        ckpt.load_matching(model, weights, f"checkpoint {ck}")
    return ck, st


def _saved_caption_settings(st: dict[str, Any]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The caption fields and weights a checkpoint was trained with, from its config (checkpoints
    made before the options existed trained on the default field; older ones also kept a copy at
    the top level, which wins as it did then)."""
    saved = {**st.get("config", {}), **{k: st[k] for k in ("caption_fields", "caption_weights") if k in st}}
    fields = parse_fields(saved.get("caption_fields") or DEFAULT_FIELDS)
    return fields, parse_weights(saved.get("caption_weights") or (), fields)


def check_caption_settings(ck: Path, st: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with other caption fields or (effective) weights than checkpoint `ck`'s:
    they change which caption each sample trains on, so the run would silently diverge."""
    fields, weights = _saved_caption_settings(st)
    same = fields == cfg.caption_fields and np.allclose(normalised(weights, len(fields)), normalised(cfg.caption_weights, len(fields)))
    if not same:
        raise UserError(f"checkpoint {ck} was trained with {_caption_settings(fields, weights)}, this run has "
                        f"{_caption_settings(cfg.caption_fields, cfg.caption_weights)}: resume with the checkpoint's "
                        "caption_fields and caption_weights, or train into a new --out")
    saved = st.get("config", {})
    for name in ("caption_scores", "caption_score_temperature", "caption_score_threshold"):  # the draw by caption scores
        theirs, ours = saved.get(name, getattr(TrainConfig, name)), getattr(cfg, name)
        if str(theirs) != str(ours):
            raise UserError(f"checkpoint {ck} was trained with {name} {theirs}, this run has {ours}: resume with the "
                            "checkpoint's, or train into a new --out")


def check_holdout(ck: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with other held-out keys (val_fraction, val_keys) than checkpoint `ck`'s:
    they change which samples train, so every batch from then on."""
    theirs = (saved.get("val_fraction", 0.0), saved.get("val_keys", 0))
    if theirs != (cfg.val_fraction, cfg.val_keys):
        raise UserError(f"checkpoint {ck} was trained holding out val_fraction {theirs[0]} val_keys {theirs[1]}, this run "
                        f"val_fraction {cfg.val_fraction} val_keys {cfg.val_keys}: resume with the checkpoint's, or train into a new --out")


def check_lora(ck: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with other LoRA settings (rank, alpha, targets, variant; on or off) than
    checkpoint `ck`'s: they change which parameters exist and train."""
    theirs, mine = lora.settings_of(saved), lora.settings_of(cfg)
    if theirs != mine:
        show = lambda s: " ".join(f"{k} {s[k]}" for k in lora.SETTINGS if k in s) if s["lora_rank"] else "lora_rank 0 (no LoRA)"  # noqa: E731
        raise UserError(f"checkpoint {ck} was trained with {show(theirs)}, this run has {show(mine)}: resume with the "
                        "checkpoint's LoRA settings, or train into a new --out (init = checkpoint:... to start from it)")


def check_feature_dtypes(ck: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume on features stored in another dtype (text_dtype, e.g. float16 -> int8, or
    latent_dtype) than checkpoint `ck` trained on: every batch would differ from then on."""
    for name in FEATURE_DTYPES:
        theirs, ours = saved.get(name, getattr(FeatureConfig, name)), getattr(cfg, name)
        if theirs != ours:
            raise UserError(f"checkpoint {ck} was trained on features with {name} {theirs}, this run has {ours}: resume "
                            f"with {name} = {theirs!r}, or train into a new --out (init = checkpoint:... to start from it)")


def check_resume_features(out: Path, cfg: TrainConfig) -> None:
    """Before any work (features included): a --resume's feature dtypes against the newest
    checkpoint in `out` (none, or unreadable: left to load_resume_weights)."""
    found = ckpt.checkpoint_dirs(out)
    try:
        saved = json.loads((found[0] / "trainer_state.json").read_text()).get("config", {}) if found else None
    except (OSError, ValueError):
        return
    if saved is not None:
        check_feature_dtypes(found[0], saved, cfg)


def _caption_settings(fields: tuple[str, ...], weights: tuple[float, ...]) -> str:
    """The caption settings as the resume error names them."""
    return f"caption_fields [{', '.join(fields)}] caption_weights [{', '.join(f'{w:g}' for w in weights) or 'equal'}]"


def restore_training_state(run: Any, ck: Path, st: dict[str, Any], opt) -> None:
    """EMA, optimizer, schedule, torch RNG and data position of `run` (a t2i.train.loop.Run) from
    checkpoint `ck` (after the model is on its device and, under FSDP, sharded)."""
    ema_sd = ckpt.load_weights(ck, "ema")
    run.ema.shadow_params = [sharding.shard_like(ema_sd[n].clone(), param) for n, param in zip(run.names, run.model.parameters())]
    sharding.load_full_optimizer_state(opt, ckpt.optimizer_from_tensors(ck / "optimizer.safetensors"))
    run.sched.load_state_dict(st["scheduler"])
    run.ema.optimization_step = st["ema_step"]
    rng = ckpt.load_weights(ck, "rng")
    torch.set_rng_state(rng["torch_cpu"])
    run.step, run.epoch, run.batch_pos = st["step"], st["epoch"], st["batch_in_epoch"]
    if run.accel.is_main_process:
        recovery.truncate_log(run.log_path, run.step)  # drop log lines after the checkpoint: they will be redone
