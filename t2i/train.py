"""The PixArt-alpha training loop (DiT/nanoGPT style) on diffusers + accelerate.

    from t2i.train import TrainConfig, train
    train(TrainConfig(preset="PixArt-tiny/2", resolution=16, vae="tiny/vae", text_encoder="tiny/t5",
                      steps=200), shards="captions/", out="runs/tiny")

Features are computed first when missing (t2i.features); the loop samples latents from the
stored posterior (mean + std * noise), drops 10% of captions to the learned null caption,
trains with the IDDPM hybrid loss, and writes checkpoints (t2i.checkpoint) that `--resume`
continues from exactly: same data order, same noise, same losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.errors import UserError
from t2i import checkpoint as ckpt
from t2i.features import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, FeatureConfig, compute_features, features_dir


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is untouched."""


@dataclass
class TrainConfig:
    name: str = "train"
    preset: str = "PixArt-XL/2"
    init: str = "scratch"  # scratch | dit:PATH | pixart:DIR | checkpoint:DIR
    resolution: int = 256
    buckets: bool = False
    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_tokens: int = 120
    text_dtype: str = "float16"
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    lr: float = 2e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03
    grad_clip: float = 0.01
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1
    learned_sigma: bool = True
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: leave torch's default)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(vae=self.vae, text_encoder=self.text_encoder, resolution=self.resolution,
                             buckets=self.buckets, max_tokens=self.max_tokens, text_dtype=self.text_dtype)

    def validate(self) -> None:
        from t2i.models import get_preset

        if self.init == "scratch":
            get_preset(self.preset)
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16, fp16: pick one")
        for name in ("batch_size", "grad_accum", "steps", "checkpoint_every", "log_every", "max_tokens", "resolution"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}: fix the stage settings")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def vae_scale_factor(vae_spec: str) -> int:
    from diffusers import AutoencoderKL

    from t2i.features import _subfolder

    try:
        cfg = AutoencoderKL.load_config(vae_spec, subfolder=_subfolder(vae_spec, "vae"))
    except Exception:
        try:
            cfg = AutoencoderKL.load_config(vae_spec)
        except Exception as e:
            raise UserError(f"cannot read the VAE config of {vae_spec!r}: pass a local AutoencoderKL directory or a reachable HF id") from e
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def _patch_of(cfg: TrainConfig) -> int:
    from t2i.models import get_preset

    if cfg.init == "scratch":
        return get_preset(cfg.preset).patch
    return 0  # known only once the init model is loaded; checked then


def build_model(cfg: TrainConfig, latent_size: int, caption_channels: int):
    """(PixArtWithNull, info) from the stage's `init`."""
    from diffusers import PixArtTransformer2DModel

    from t2i.models import PixArtWithNull, build_transformer, get_preset

    kind, _, arg = cfg.init.partition(":")
    null = None
    # size/aspect micro-conditions at 1024 px, as PixArt-XL-2-1024-MS (diffusers ties them to latent 128)
    micro = cfg.resolution >= 1024
    if kind == "scratch":
        if micro and get_preset(cfg.preset).hidden % 3:
            raise UserError(f"{cfg.preset} at {cfg.resolution} px: size/aspect embeddings need hidden divisible by 3: use a PixArt-*/2 preset or a lower resolution")
        tr = build_transformer(cfg.preset, latent_size, caption_channels, learned_sigma=cfg.learned_sigma, use_additional_conditions=micro)
    elif kind == "dit":
        from t2i.import_dit import import_dit

        tr, _ = import_dit(arg, caption_channels=caption_channels, latent_size=latent_size)
    elif kind == "pixart":
        tr = PixArtTransformer2DModel.from_pretrained(arg, subfolder="transformer" if (Path(arg) / "transformer").is_dir() else None)
    elif kind == "checkpoint":
        ck = ckpt.require_checkpoint(arg)
        tr, null = ckpt.load_transformer(ck, which="model", sample_size=latent_size, use_additional_conditions=micro)
    else:
        raise UserError(f"init {cfg.init!r} is not scratch, dit:PATH, pixart:DIR or checkpoint:DIR: fix the stage's init")
    if tr.config.caption_channels != caption_channels:
        raise UserError(f"init model expects {tr.config.caption_channels}-d captions, the text encoder gives {caption_channels}: use the matching text encoder")
    if tr.config.sample_size != latent_size:
        tr.register_to_config(sample_size=latent_size)
    model = PixArtWithNull(tr.float(), cfg.max_tokens)
    if null is not None and null.shape == model.null_caption.shape:
        with torch.no_grad():
            model.null_caption.copy_(null)
    return model


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    path.write_text("".join(l + "\n" for l in keep))


def train(cfg: TrainConfig, out: str | Path, shards: str | Path | None = None, features: str | Path | None = None,
          resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one training stage. `shards`: caption shards (features are computed when missing);
    `features`: a features root (default `<out>/features`). `stop_after`: stop (with a
    checkpoint) after that many optimizer steps, as if interrupted. Returns a summary."""
    from accelerate import Accelerator
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from t2i.data import FeatureDataset
    from t2i.diffusion import Diffusion
    from t2i.models import device_peak_flops, flops_per_image, preset_of

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accel = Accelerator(mixed_precision=cfg.mixed_precision)
    rank, world = accel.process_index, accel.num_processes

    factor = vae_scale_factor(cfg.vae)
    patch = _patch_of(cfg)
    if patch and cfg.resolution % (patch * factor):
        raise UserError(f"resolution {cfg.resolution} is not divisible by patch x VAE factor ({patch} x {factor} = {patch * factor}): pick a multiple of {patch * factor}")

    # 1. features (main process computes; the others wait)
    fcfg = cfg.feature_config()
    froot = Path(features) if features else out / "features"
    fdir = features_dir(froot, fcfg)
    if shards is not None:
        if accel.is_main_process:
            compute_features(shards, froot, fcfg, device=str(accel.device), progress=progress)
        accel.wait_for_everyone()
    data = FeatureDataset(fdir, cfg.max_tokens)
    probe = data.get(np.array([0]))
    latent_size = probe.latent_mean.shape[-1] if not cfg.buckets else cfg.resolution // factor
    caption_channels = probe.text.shape[-1]
    fcfg_saved = json.loads((fdir / "config.json").read_text())

    # 2. model, optimiser, EMA
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, latent_size, caption_channels)
    tr = model.transformer
    p = tr.config.patch_size
    if cfg.resolution % (p * factor):
        raise UserError(f"resolution {cfg.resolution} is not divisible by patch x VAE factor ({p} x {factor} = {p * factor}): pick a multiple of {p * factor}")
    if cfg.grad_checkpointing:
        tr.enable_gradient_checkpointing()
    model.to(accel.device)
    fused = accel.device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    names = [n for n, _ in model.named_parameters()]
    diffusion = Diffusion(learned_sigma=cfg.learned_sigma)
    scaling = _scaling_factor(cfg.vae)

    # 3. resume
    step, epoch, batch_pos = 0, 0, 0
    log_path = out / "log.jsonl"
    if resume:
        ck = ckpt.latest_checkpoint(out)
        if ck is None:
            raise UserError(f"--resume but no checkpoint in {out}: drop --resume to start fresh")
        ckpt.load_matching(model, ckpt.load_weights(ck, "model"), f"checkpoint {ck}")
        ema_sd = ckpt.load_weights(ck, "ema")
        ema.shadow_params = [ema_sd[n].to(accel.device).clone() for n in names]
        opt.load_state_dict(ckpt.optimizer_from_tensors(ck / "optimizer.safetensors"))
        st = json.loads((ck / "trainer_state.json").read_text())
        sched.load_state_dict(st["scheduler"])
        ema.optimization_step = st["ema_step"]
        rng = ckpt.load_weights(ck, "rng")
        torch.set_rng_state(rng["torch_cpu"])
        step, epoch, batch_pos = st["step"], st["epoch"], st["batch_in_epoch"]
        _truncate_log(log_path, step)
    elif log_path.exists() and accel.is_main_process:
        log_path.unlink()

    run_model = torch.compile(model) if cfg.compile else model
    run_model, opt = accel.prepare(run_model, opt)

    hw = (probe.latent_mean.shape[-2], probe.latent_mean.shape[-1])
    flops_img = flops_per_image(preset_of(tr.config), hw, cfg.max_tokens, caption_channels)
    peak = device_peak_flops(accel.device)
    target = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    summary: dict[str, Any] = {"out": str(out), "features": str(fdir), "samples": len(data), "start_step": step}
    last_ck: Path | None = ckpt.latest_checkpoint(out)

    def trainer_state() -> dict[str, Any]:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_pos, "scheduler": sched.state_dict(),
                "ema_step": ema.optimization_step, "config": asdict(cfg), "features": fcfg_saved,
                "scaling_factor": scaling, "vae_scale_factor": factor}

    def save() -> Path:
        nonlocal last_ck
        accel.wait_for_everyone()
        if accel.is_main_process:
            ema_state = dict(zip(names, ema.shadow_params))
            last_ck = ckpt.save_checkpoint(out, step, model, ema_state, opt.optimizer if hasattr(opt, "optimizer") else opt, trainer_state(), cfg.keep_checkpoints)
        accel.wait_for_everyone()
        return last_ck

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not (progress and accel.is_main_process))
    task = bar.add_task(cfg.name, total=cfg.steps, completed=step, info="")
    acc = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0, "images": 0}
    t_last = time.perf_counter()
    model.train()
    with bar:
        while step < target:
            batches = data.epoch_batches(epoch, cfg.seed, cfg.batch_size, world)
            if not batches:
                raise UserError(f"no full batch of {cfg.batch_size * world} samples in {fdir}: lower batch_size")
            while batch_pos < len(batches) and step < target:
                micro_losses = []
                for micro in range(cfg.grad_accum):
                    if batch_pos >= len(batches):
                        break
                    idx = batches[batch_pos][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
                    b = data.get(idx)
                    # one generator per (seed, epoch, batch, rank): the same noise after a resume
                    g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, batch_pos, rank]).generate_state(1)[0]))
                    batch_pos += 1
                    mean, std = b.latent_mean, b.latent_std
                    x0 = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
                    noise = torch.randn(x0.shape, generator=g)
                    t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=g)
                    drop = torch.rand(x0.shape[0], generator=g) < cfg.caption_dropout
                    x0, noise, t, drop = (v.to(accel.device) for v in (x0, noise, t, drop))
                    x_t = diffusion.add_noise(x0, noise, t)
                    added = None
                    if tr.use_additional_conditions:
                        B = x0.shape[0]
                        added = {"resolution": torch.tensor([[b.height, b.width]] * B, device=accel.device, dtype=torch.float32),
                                 "aspect_ratio": torch.tensor([[b.height / b.width]] * B, device=accel.device, dtype=torch.float32)}
                    sync = micro == cfg.grad_accum - 1 or batch_pos >= len(batches)
                    ctx = accel.no_sync(run_model) if not sync and world > 1 else _null()
                    with ctx, accel.autocast():
                        pred = run_model(x_t, t, b.text.to(accel.device), b.mask.to(accel.device), drop=drop, added_cond_kwargs=added)
                        losses = diffusion.loss(pred, x0, x_t, noise, t)
                        loss = losses["loss"].mean()
                    lv = accel.reduce(loss.detach(), reduction="mean") if world > 1 else loss.detach()
                    if not torch.isfinite(lv):
                        opt.zero_grad(set_to_none=True)
                        where = f"last good checkpoint: {last_ck}" if last_ck else "no checkpoint was written yet"
                        raise TrainingDiverged(f"loss became {lv.item()} at step {step + 1}; stopped without saving, {where}: lower lr or grad_clip, or use fp32/bf16, then --resume")
                    accel.backward(loss / cfg.grad_accum)
                    micro_losses.append({k: float(v.detach().mean()) for k, v in losses.items()})
                    acc["images"] += x0.shape[0] * world
                grad_norm = accel.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else _grad_norm(model)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                ema.step(model.parameters())
                step += 1
                for k in ("loss", "mse", "vb"):
                    acc[k] += float(np.mean([m[k] for m in micro_losses]))
                acc["n"] += 1
                if step % cfg.log_every == 0 or step == target:
                    now = time.perf_counter()
                    ips = acc["images"] / max(now - t_last, 1e-9)
                    rec = {"step": step, "epoch": epoch, "loss": acc["loss"] / acc["n"], "mse": acc["mse"] / acc["n"],
                           "vb": acc["vb"] / acc["n"], "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                           "images_per_s": ips, "mfu": (ips * flops_img / peak) if peak else None, "time": time.time()}
                    if accel.is_main_process:
                        _append_jsonl(log_path, rec)
                    bar.update(task, completed=step, info=f"loss {rec['loss']:.4f} {ips:.1f} img/s")
                    acc = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0, "images": 0}
                    t_last = now
                else:
                    bar.update(task, completed=step)
                if step % cfg.checkpoint_every == 0 and step < target:
                    save()
            if batch_pos >= len(batches):
                epoch, batch_pos = epoch + 1, 0
    save()
    summary.update({"step": step, "epoch": epoch, "checkpoint": str(last_ck), "log": str(log_path)})
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _grad_norm(model) -> torch.Tensor:
    grads = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)


def _scaling_factor(vae_spec: str) -> float:
    from diffusers import AutoencoderKL

    from t2i.features import _subfolder

    try:
        cfg = AutoencoderKL.load_config(vae_spec, subfolder=_subfolder(vae_spec, "vae"))
    except Exception:
        cfg = AutoencoderKL.load_config(vae_spec)
    return float(cfg.get("scaling_factor", 0.18215))
