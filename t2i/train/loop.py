"""The training loop: one stage from its features directory to its last checkpoint (`train`), the
run in progress (`Run`: data position, loss checks, checkpoints) and its steps (`train_loop`,
`train_step`, `log_step`). The stage's conditioning (t2i.conditioning) and objective
(t2i.objective) are opened here and used only through their interfaces."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from shards.errors import UserError
from shards.hub import absolute_model
from shards.ledger import Ledger
from t2i import checkpoint as ckpt
from t2i import lora
from t2i import recovery
from t2i import sharding
from t2i.conditioning import Conditioning
from t2i.kinds import conditioning_class
from t2i.lora import trainable
from t2i.encoders import VaeFactors
from t2i.noise import sample_keys
from t2i.objective import build_objective
from t2i.repa import check_teacher_grids, repa_terms
from t2i.routing import RoutedBlocks, attach_routing
from t2i.text_ondemand import OnDemandText, same_batch
from t2i.trackers import Trackers
from t2i.train.config import TrainConfig, check_resolution, per_process_batch, preflight
from t2i.train.resume import (check_resume_features, failed_images, find_features, load_resume_weights,
                             restore_training_state)
from t2i.train.step import TrainStep, make_accelerator, make_inputs, setup_optimization
from t2i.train.validate import Validation


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the last good checkpoint is untouched."""


class Run:
    """One training stage in progress: its objects, its data position (step, epoch, batch_pos),
    the losses not yet checked, and checkpointing."""

    def __init__(self, cfg: TrainConfig, accel, out: Path, model, names: list[str], sched, ema, global_batch: int,
                 state_extra: dict[str, Any], conditioning: Conditioning) -> None:
        self.cfg, self.accel, self.out, self.model, self.names = cfg, accel, out, model, names
        self.conditioning = conditioning
        self.sched, self.ema, self.global_batch, self.state_extra = sched, ema, global_batch, state_extra
        self.rank, self.world = accel.process_index, accel.num_processes
        # what checkpoints hold: every weight and buffer, or a LoRA stage's adapter alone
        self.saved = set(names) if cfg.lora_rank else set(model.state_dict())
        self.stepper: TrainStep | None = None
        self.validation: Validation | None = None  # set by train() once the data is open
        self.text = same_batch  # a loader Batch as the step sees it (text_dtype ids: encoded, t2i.text_ondemand)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self.log_path = out / "log.jsonl"
        self.last_ck: Path | None = ckpt.latest_checkpoint(out)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, the stepper's log_terms on device) not yet checked
        self.window: list[torch.Tensor] = []  # checked per-step rows (averaged over ranks) since the last log line
        # parameters this rank holds: all of them under DDP, about 1/world under FSDP
        self.params_local = sum((q.to_local() if sharding.is_sharded(q) else q).numel() for q in model.parameters())
        self.trackers = Trackers(cfg.report_to, out, cfg.name, asdict(cfg), main=accel.is_main_process)
        self.trace: Path | None = None
        if cfg.trace_keys:
            (out / "trace").mkdir(exist_ok=True)
            self.trace = out / "trace" / f"rank-{self.rank}.jsonl"

    def trainer_state(self) -> dict[str, Any]:
        """What trainer_state.json records: the data position, schedule and EMA step, the settings."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_pos, "global_batch": self.global_batch,
                "world_size": self.world, "scheduler": self.sched.state_dict(), "ema_step": self.ema.optimization_step,
                "config": recorded_config(self.cfg), **self.state_extra,
                **({"null_tokens": self.model.null_tokens} if getattr(self.model, "null_tokens", 0) else {})}

    def check_finite(self) -> None:
        """One host sync (and one all-reduce) for all steps since the last check: raise on the
        first non-finite loss of any rank."""
        if not self.pending:
            return
        vals = torch.stack([v for _, v in self.pending])
        if self.world > 1:
            vals = self.accel.reduce(vals, reduction="mean")
        vals = vals.cpu()
        bad = (~torch.isfinite(vals[:, 0])).nonzero()
        if len(bad):
            i = int(bad[0])
            where = f"last good checkpoint: {self.last_ck}" if self.last_ck else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {float(vals[i, 0])} at step {self.pending[i][0]}; stopped without saving, {where}: lower lr or grad_clip, or use fp32/bf16, then --resume")
        self.window.append(vals)
        self.pending.clear()

    def save(self) -> Path:
        """Write a checkpoint (rank 0; every rank joins the gathers under FSDP) and sample it for the trackers."""
        accel, opt = self.accel, self.stepper.opt
        self.check_finite()
        accel.wait_for_everyone()
        if self.cfg.fsdp or accel.is_main_process:  # under FSDP every rank joins the gathers
            weights = {n: v for n, v in sharding.full_model_state(self.model).items() if n in self.saved}
            ema_state = dict(zip(self.names, sharding.full_tensors(self.ema.shadow_params)))
            opt_state = sharding.full_optimizer_state(opt.optimizer if hasattr(opt, "optimizer") else opt)
        if accel.is_main_process:
            extras = self.conditioning.checkpoint_extras(weights, ema_state)
            self.last_ck = ckpt.save_checkpoint(self.out, self.step, self.model.transformer, weights, ema_state, opt_state,
                                                self.trainer_state(), self.cfg.keep_checkpoints, extras=extras)
            self.trackers.samples(self.last_ck, self.step)
            if self.trace is not None:
                recovery.append_jsonl(self.trace, {"event": "checkpoint", "step": self.step, "rank": self.rank})
        accel.wait_for_everyone()
        return self.last_ck


def recorded_config(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Settings as a checkpoint records them: the VAE, text encoder and init as absolute paths
    (or hub ids), so sample, export and eval of the run work from any working directory."""
    rec = asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    paths = [k for k in ("vae", "text_encoder") if isinstance(rec.get(k), str)] + (["init"] if ":" in str(rec.get("init", "")) else [])
    return {**rec, **{k: absolute_model(rec[k]) for k in paths}}


def routed_count(model) -> int:
    """How many blocks of `model` route tokens (t2i.routing; 0 without token dropping)."""
    blocks = model.transformer.transformer_blocks
    return blocks.end - blocks.start if isinstance(blocks, RoutedBlocks) else 0


def train_loop(run: Run, data, target: int, latent_hw: tuple[int, int], caption_channels: int, progress: bool) -> None:
    """Optimizer steps until `target`: grad_accum micro-batches each (an epoch's last step may
    have fewer), from the loader's batches of this rank; logs, checks and checkpoints as it goes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from t2i.loader import make_loader
    from t2i.models import device_peak_flops, flops_per_image, preset_of

    cfg, accel = run.cfg, run.accel
    flops_img = flops_per_image(preset_of(run.model.transformer.config), latent_hw, cfg.max_tokens, caption_channels,
                                cross_attention=run.conditioning.cross_attention, token_drop=cfg.token_drop,
                                routed_blocks=routed_count(run.model), token_macs=sum(t.macs for t in run.stepper.terms))
    peak = device_peak_flops(accel.device)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not (progress and accel.is_main_process))
    task = bar.add_task(cfg.name, total=cfg.steps, completed=run.step, info="")
    images, t_last = 0, time.perf_counter()
    if run.step >= target:
        return
    loader = make_loader(data, run.epoch, cfg.seed, run.global_batch, run.rank, run.world, start_batch=run.batch_pos,
                         workers=cfg.loader_workers, pin_memory=accel.device.type == "cuda", epochs=None)
    batches = iter(loader)
    run.model.train()
    with bar:
        while run.step < target:
            last = train_step(run, batches)
            images += last.samples
            val = run.validation.measure() if run.validation.due(run.step) else {}
            if run.step % cfg.log_every == 0 or run.step == target or val:
                now = time.perf_counter()
                ips = images / max(now - t_last, 1e-9)
                loss = log_step(run, last.grad_norm, ips, flops_img, peak, val)
                bar.update(task, completed=run.step, info=f"loss {loss:.4f} {ips:.1f} img/s")
                images, t_last = 0, now
            else:
                bar.update(task, completed=run.step)
            if run.step % cfg.checkpoint_every == 0 and run.step < target:
                run.save()
            if last.end_of_epoch:
                run.epoch, run.batch_pos = run.epoch + 1, 0
    del batches, loader  # stops the loader workers


class StepResult(NamedTuple):
    grad_norm: torch.Tensor
    samples: int  # over all ranks
    end_of_epoch: bool


def train_step(run: Run, batches) -> StepResult:
    """One optimizer step: up to grad_accum micro-batches (not past the epoch's last batch), each
    with its per-sample noise from (seed, epoch, batch, position in the global batch)."""
    cfg, stepper = run.cfg, run.stepper
    micro_losses, samples = [], 0
    for micro in range(cfg.grad_accum):
        b = run.text(next(batches))
        share = len(b.keys)
        keys = sample_keys(cfg.seed, b.epoch, b.batch_pos, run.rank * share + np.arange(share))
        if run.trace is not None:
            fields = {"caption_fields": b.caption_fields} if len(cfg.caption_fields) > 1 else {}
            recovery.append_jsonl(run.trace, {"step": run.step + 1, "epoch": b.epoch, "batch": b.batch_pos, "rank": run.rank,
                                              "world": run.world, "keys": b.keys, **fields})
        run.epoch, run.batch_pos = b.epoch, b.batch_pos + 1
        inp = make_inputs(b, run.state_extra["scaling_factor"], stepper.objective, cfg.caption_dropout, keys, stepper.token_drop)
        inp["cond"] = run.conditioning.inputs(b)
        inp.update({term.name: term.inputs(b) for term in stepper.terms})
        last_micro = micro == cfg.grad_accum - 1 or b.last_in_epoch
        micro_losses.append(stepper.micro(inp, sync=last_micro, size=(b.height, b.width)))
        samples += share * run.world
        if b.last_in_epoch:
            break
    grad_norm = stepper.update()
    run.step += 1
    run.pending.append((run.step, torch.stack(micro_losses).mean(0)))
    return StepResult(grad_norm, samples, b.last_in_epoch)


def log_step(run: Run, grad_norm: torch.Tensor, ips: float, flops_img: float, peak: float | None,
             extra: dict[str, float] | None = None) -> float:
    """Check the losses since the last line and append one log line (rank 0 writes), with `extra`
    (the validation losses when one ran at this step); returns the loss."""
    run.check_finite()
    vals = torch.cat(run.window).mean(0).tolist()
    losses = dict(zip(run.stepper.log_terms, vals))  # the objective's terms (loss, mse, vb), then auxiliary ones
    rec = {"step": run.step, "epoch": run.epoch, **losses, "lr": run.sched.get_last_lr()[0], "grad_norm": float(grad_norm), "images_per_s": ips, "mfu": (ips * flops_img / peak) if peak else None,
           "params_local": run.params_local, **(extra or {}), "time": time.time()}
    if run.accel.is_main_process:
        recovery.append_jsonl(run.log_path, rec)
    run.trackers.log(rec, run.step)
    run.window.clear()
    return rec["loss"]


def start_run(cfg: TrainConfig, accel, out: Path, fdir: Path, probe, vae: VaeFactors, conditioning: Conditioning,
              resume: bool, global_batch: int, local_batch: int) -> Run:
    """The stage's model (from its conditioning, seeded), objective, optimizer, schedule and EMA, as
    the checkpoint of `out` left them when `resume`; the Run with its TrainStep."""
    latent_size = probe.latent_mean.shape[-1] if not cfg.buckets else cfg.resolution // vae.spatial
    objective = build_objective(vars(cfg))
    torch.manual_seed(cfg.seed)
    model = conditioning.build_model(cfg, latent_size, probe.text.shape[-1], objective.learned_sigma)
    check_resolution(cfg.resolution, model.transformer.config.patch_size, vae.spatial)
    extra_lora = adapt(cfg, model, out, resume, accel)
    token_drop = attach_routing(model, cfg.token_drop, cfg.token_drop_start, cfg.token_drop_end)
    terms = repa_terms(vars(cfg), model, probe.teacher.shape[-1] if probe.teacher is not None else 0)  # its projector: before resume
    # resume: whole tensors, the weights go in before FSDP shards the model, the EMA and
    # optimizer state after, split the way their parameters are
    names = [n for n, _ in trainable(model)]  # a LoRA stage's: the adapter's alone
    ck, st = (load_resume_weights(out, model, global_batch, accel.num_processes, local_batch, accel.is_main_process, cfg)
              if resume else (None, None))
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    extra = {"features": recorded_config(json.loads((fdir / "config.json").read_text())), "scaling_factor": vae.scaling,
             "vae_scale_factor": vae.spatial, **extra_lora}
    run = Run(cfg, accel, out, model, names, sched, ema, global_batch, extra, conditioning)
    if ck is not None:
        restore_training_state(run, ck, st, opt)
    elif run.log_path.exists() and accel.is_main_process:
        run.log_path.unlink()
    run.stepper = TrainStep.prepare(cfg, accel, model, opt, sched, ema, objective, terms=terms, token_drop=token_drop)
    return run


def adapt(cfg: TrainConfig, model, out: Path, resume: bool, accel) -> dict[str, Any]:
    """A LoRA stage (cfg.lora_rank > 0): the frozen base written once to `<out>/lora_base/` (on
    resume, read back from there: the adapter goes on the very base it was trained on), then the
    adapter added (t2i.lora). Returns what trainer_state records of it (nothing without LoRA)."""
    if not cfg.lora_rank:
        return {}
    base = out / lora.BASE_DIR
    if resume and (base / "model.safetensors").is_file():
        ckpt.load_matching(model, ckpt.load_weights(base, "model"), f"LoRA base {base}")
    elif accel.is_main_process:
        lora.save_base(out, model)
    accel.wait_for_everyone()
    lora.add_lora(model, cfg)
    return {"lora_base": str(base.resolve()), "lora": lora.settings_of(cfg)}


@recovery.guard_run_dir  # one writer per run directory; no fresh run into an old one
def train(cfg: TrainConfig, out: str | Path, features: str | Path | None = None, resume: bool = False,
          stop_after: int | None = None, progress: bool = True, label_shards: str | Path | None = None) -> dict[str, Any]:
    """Run one training stage on a features directory: `features` is one (made by `t2i-data
    features`, for these settings) or a features root holding it under its cache key (default
    `<out>/features`); t2i.stage.run_stage makes it from caption shards first. `stop_after`: stop
    (with a checkpoint) after that many optimizer steps, as if interrupted. `label_shards`: the
    caption shards a class-cond stage reads its labels from (nothing else reads them here).
    Returns a summary.

    On several processes (torchrun / accelerate launch) every rank takes its slice of each global
    batch; rank 0 writes checkpoints and the log. A checkpoint resumes on any number of processes
    that divides its global batch (set `global_batch`, or batch_size x processes equal to it)."""
    from t2i.data import StreamingFeatureDataset

    vae = preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accel = make_accelerator(cfg)
    local_batch, global_batch = per_process_batch(cfg, accel.num_processes)
    # what the model is conditioned on (a class-cond stage's labels: read before any work)
    conditioning = conditioning_class(cfg.kind).open(cfg, out, label_shards, resume, accel)
    if resume:
        check_resume_features(out, cfg)  # a changed feature dtype: named before the features are looked for
    fdir = find_features(Path(features) if features is not None else out / "features", cfg)  # made beforehand: only opened
    text = OnDemandText.for_config(cfg, accel.device, conditioning.cross_attention)  # ids: the frozen T5 on this device
    with accel.main_process_first():  # rank 0 builds and caches the index (t2i.feature_index); the others load it
        data = StreamingFeatureDataset(fdir, cfg.max_tokens, cfg.caption_fields, cfg.caption_weights, cfg.holdout(),
                                       teacher=bool(cfg.repa_weight),  # REPA reads the stored teacher tokens too
                                       scoring=cfg.caption_scoring())
    ledger = Ledger(out, "train", accel.device)
    probe = text(data.get(np.array([0])))
    run = start_run(cfg, accel, out, fdir, probe, vae, conditioning, resume, global_batch, local_batch)
    run.text = text
    if run.stepper.terms:  # REPA: every bucket's teacher grid fits the model's token grid, before any step
        check_teacher_grids(data, run.model.transformer.config.patch_size)
    run.validation = Validation(data, cfg, run)
    target = cfg.steps if stop_after is None else min(cfg.steps, run.step + stop_after)
    summary: dict[str, Any] = {"out": str(out), "features": str(fdir), "samples": len(data), "start_step": run.step,
                               "skipped_images": failed_images(fdir), "world_size": accel.num_processes,
                               "global_batch": global_batch, "params_local": run.params_local,
                               "val_samples": len(data.val_indices)}
    train_loop(run, data, target, tuple(probe.latent_mean.shape[-2:]), probe.text.shape[-1], progress)
    run.save()
    summary.update({"step": run.step, "epoch": run.epoch, "checkpoint": str(run.last_ck), "log": str(run.log_path)})
    done = run.step - summary["start_step"]
    summary["ledger"] = ledger.close(steps=done, images=done * local_batch * cfg.grad_accum)  # this rank's share
    run.trackers.finish(run.step, summary["ledger"])
    return summary
