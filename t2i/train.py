"""The PixArt-alpha trainer (DiT/nanoGPT style) on diffusers + accelerate.

    from t2i.train import TrainConfig, train
    train(TrainConfig(preset="PixArt-tiny/2", resolution=16, vae="tiny/vae", text_encoder="tiny/t5",
                      steps=200), out="runs/tiny", features="feats/")

The loop trains on a features directory (t2i.features; t2i.stage.run_stage computes it from
caption shards first, as its own step); it samples latents from the stored posterior (mean +
std * noise), drops 10% of captions to the learned null caption (the stage's conditioning,
t2i.conditioning), trains with its objective (t2i.objective: today the IDDPM hybrid loss), and
writes checkpoints (t2i.checkpoint) that `--resume` continues from exactly: same data order,
same noise, same losses.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from shards.errors import UserError
from shards.ledger import Ledger
from t2i import checkpoint as ckpt
from t2i import recovery
from t2i import sharding
from t2i.caption_fields import DEFAULT_FIELDS, normalised, parse_fields, parse_weights
from t2i.conditioning import Conditioning
from t2i.encoders import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, VaeFactors, vae_factors
from t2i.features import FeatureConfig, features_dir
from t2i.kinds import conditioning_class
from t2i.models import ATTENTION_ORDERS, attention_kernels, compile_blocks, get_preset
from t2i.noise import normal_pairs, random_words, sample_keys, uniforms
from t2i.objective import LossTerm, Objective, add_terms, build_objective, check_objective
from t2i.trackers import Trackers, check_report_to


@dataclass
class TrainConfig:
    """One training stage's settings (a manifest's [[stages]] entry, or the train command's flags)."""

    name: str = "train"
    kind: str = "text-to-image"  # t2i.conditioning: text-to-image (PixArt) | class-cond (a class-conditional DiT)
    class_column: str = ""  # class-cond: the caption-shard column holding each image's label
    preset: str = "PixArt-XL/2"
    init: str = "scratch"  # scratch | dit:PATH | pixart:DIR | checkpoint:DIR
    resolution: int = 256
    buckets: bool = False
    vae: str = DEFAULT_VAE
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_tokens: int = 120
    text_dtype: str = "float16"
    latent_dtype: str = "float32"  # how features store latents (t2i.features.FeatureConfig)
    batch_size: int = 64  # per process, per micro-batch (ignored when global_batch is set)
    global_batch: int = 0  # samples per micro-batch over all processes; 0: batch_size x processes
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    lr: float = 2e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.03
    grad_clip: float = 0.01
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1
    # several captions per image (Sana-style): each sample trains on one of these caption-shard
    # fields per epoch, drawn with caption_weights (default equal); t2i.caption_fields
    caption_fields: tuple = DEFAULT_FIELDS
    caption_weights: tuple = ()
    # the objective (t2i.objective; DDPM with the IDDPM hybrid loss, t2i.diffusion):
    learned_sigma: bool = True
    prediction_type: str = "epsilon"  # epsilon (the paper's) | v_prediction (better on small latents)
    # timesteps drawn as floor(T * u**p) (draw_timesteps): 1 is uniform, the paper's; p < 1 trains
    # the noisy steps, where an object's outline is decided, more often
    timestep_power: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False
    attention: str = "auto"  # SDPA kernel order (t2i.models.ATTENTION_ORDERS): auto | flash | efficient | cudnn
    fsdp: bool = False  # shard weights, grads, AdamW state and EMA over the processes (t2i.sharding)
    trace_keys: bool = False  # write <out>/trace/rank-<r>.jsonl: the sample keys each rank consumed
    loader_workers: int = 2  # DataLoader worker processes reading feature rows ahead (0: in the training process)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    threads: int = 0  # CPU threads for torch (0: leave torch's default)
    report_to: str = ""  # experiment trackers, comma-separated: tensorboard | wandb | mlflow (t2i.trackers)
    sample_prompts: str = ""  # '|'-separated prompts sampled at every checkpoint for the trackers

    def __post_init__(self) -> None:
        # a TOML list, a comma-separated CLI string or a tuple; bad names fail here, before any work
        self.caption_fields = parse_fields(self.caption_fields)
        self.caption_weights = parse_weights(self.caption_weights, self.caption_fields)

    @classmethod
    def field_names(cls) -> list[str]:
        """The settings' names (what a manifest stage may set)."""
        return [f.name for f in fields(cls)]

    def feature_config(self) -> FeatureConfig:
        """The settings of the features this stage trains on."""
        return FeatureConfig(vae=self.vae, text_encoder=self.text_encoder, resolution=self.resolution,
                             buckets=self.buckets, max_tokens=self.max_tokens, text_dtype=self.text_dtype,
                             latent_dtype=self.latent_dtype, caption_fields=self.caption_fields)

    def validate(self) -> None:
        """A UserError naming the first bad setting (and its fix)."""
        if self.init == "scratch":
            get_preset(self.preset)
        conditioning_class(self.kind).check_config(self)
        check_objective(vars(self))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r} is not one of no, bf16, fp16: pick one")
        for name in ("batch_size", "grad_accum", "steps", "checkpoint_every", "log_every", "max_tokens", "resolution"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}: fix the stage settings")
        if self.attention not in ATTENTION_ORDERS:
            raise UserError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_ORDERS)}: pick one")
        if self.loader_workers < 0:
            raise UserError(f"loader_workers must be >= 0 (0: read in the training process), got {self.loader_workers}")
        if self.global_batch < 0:
            raise UserError(f"global_batch must be >= 0 (0: batch_size x processes), got {self.global_batch}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_report_to(self.report_to)


def per_process_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(per-process micro-batch, global micro-batch) for `world` processes.

    The global batch is what fixes the data order, the noise and the resume position; a run may
    resume on another number of processes as long as the global batch stays the same."""
    if cfg.global_batch:
        if cfg.global_batch % world:
            raise UserError(f"global_batch {cfg.global_batch} is not divisible by {world} processes: pick a multiple of {world}")
        return cfg.global_batch // world, cfg.global_batch
    return cfg.batch_size, cfg.batch_size * world


def preflight(cfg: TrainConfig) -> VaeFactors:
    """The checks a stage passes before any work (features included): its settings, and a
    resolution that splits into whole patches of latent cells. Returns the VAE's factors."""
    cfg.validate()
    vae = vae_factors(cfg.vae)
    check_resolution(cfg.resolution, _patch_of(cfg), vae.spatial)
    return vae


def _patch_of(cfg: TrainConfig) -> int:
    if cfg.init == "scratch":
        return get_preset(cfg.preset).patch
    return 0  # known only once the init model is loaded; checked then


def check_resolution(resolution: int, patch: int, spatial: int) -> None:
    """The image side must split into whole patches of latent cells (patch 0: not known yet)."""
    if patch and resolution % (patch * spatial):
        raise UserError(f"resolution {resolution} is not divisible by patch x VAE factor ({patch} x {spatial} = {patch * spatial}): pick a multiple of {patch * spatial}")


FEATURE_IDENTITY = ("vae", "text_encoder", "resolution", "buckets", "max_tokens", "text_dtype", "latent_dtype", "draft", "caption_fields")


def _made_with(made: dict[str, Any], key: str) -> Any:
    """A setting of a features directory's config.json, as FeatureConfig holds it (directories
    made before caption_fields existed hold the default field)."""
    if key == "caption_fields":
        return tuple(made.get(key) or DEFAULT_FIELDS)
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
        return path
    fdir = features_dir(path, want)
    if not (fdir / "config.json").is_file():
        raise UserError(f"no features for this stage's settings in {path} (looked for {fdir.name}/): run `t2i-data features "
                        f"--out {path}` with the same --vae/--text-encoder/--resolution/--max-tokens/dtypes, or pass --shards")
    return fdir


def failed_images(fdir: Path) -> int:
    """Images the features job could not read or decode (recorded in its manifest), so not trained on."""
    manifest = fdir / "manifest.json"
    return int(json.loads(manifest.read_text()).get("failed", 0)) if manifest.is_file() else 0


def load_resume_weights(out: Path, model, global_batch: int, world: int, local_batch: int,
                        set_aside: bool = True, cfg: TrainConfig | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of `out` that verifies (a damaged newer one is set aside, with a
    warning, when `set_aside`) and its trainer state, its model weights loaded into `model`.
    With `cfg`, a run whose caption fields or weights differ from the checkpoint's is refused."""
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
    ckpt.load_matching(model, ckpt.load_weights(ck, "model"), f"checkpoint {ck}")
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


def make_inputs(b, scaling: float, objective: Objective, caption_dropout: float, keys) -> dict[str, torch.Tensor]:
    """CPU tensors of one micro-batch: x0 drawn from the stored posterior, noise, timesteps (the
    objective's draw) and caption-drop flags, each sample's from its own noise key (keys[i],
    t2i.noise.sample_keys), all samples in one batched draw."""
    shape = tuple(b.latent_mean.shape[1:])
    words = random_words(keys, 2)  # each stream: timestep, caption drop, then the normals
    eps, noise = (torch.from_numpy(z).view(len(words), *shape) for z in normal_pairs(keys, math.prod(shape), first=2))
    x0 = b.latent_mean.float() + b.latent_std.float() * eps  # the posterior draw; stored maybe in 16 bits
    return {"x0": x0 * scaling, "noise": noise, "t": objective.draw_timesteps(words[:, 0]),
            "drop": torch.from_numpy(uniforms(words[:, 1]) < caption_dropout)}


def _on_device(x: torch.Tensor, device) -> torch.Tensor:
    """A conditioning input on the device: features in float32 (they may travel in 16 bits, half
    the bytes through the loader), ids and masks as they are."""
    x = x.to(device, non_blocking=True)
    return x.float() if x.is_floating_point() else x


class TrainStep:
    """The trainer's step, shared by `train()` and benchmarks/gpu_bench.py: `micro()` runs forward,
    the objective's loss (+ auxiliary loss terms) and backward of one micro-batch; `update()`
    clips, steps AdamW + schedule + EMA.

    Nothing here syncs with the host: losses and the grad norm stay device tensors until the
    caller logs them."""

    def __init__(self, accel, run_model, model, opt, sched, ema, objective: Objective, grad_accum: int = 1,
                 grad_clip: float = 0.0, fsdp: bool = False, attention: str = "auto", terms: Sequence[LossTerm] = ()) -> None:
        self.accel, self.run_model, self.model = accel, run_model, model
        self.opt, self.sched, self.ema, self.objective = opt, sched, ema, objective
        self.grad_accum, self.grad_clip, self.fsdp, self.attention = grad_accum, grad_clip, fsdp, attention
        self.terms = tuple(terms)
        self.log_terms = tuple(objective.terms) + tuple(t.name for t in self.terms)  # what micro() returns, in order
        self.use_added = getattr(model.transformer, "use_additional_conditions", False)  # a DiT has none

    @classmethod
    def prepare(cls, cfg: TrainConfig, accel, model, opt, sched, ema, objective: Objective,
                compile_backend: str = "inductor", terms: Sequence[LossTerm] = ()) -> "TrainStep":
        """Regional torch.compile of the blocks (when cfg.compile) and accelerate.prepare (DDP,
        autocast) around `model`; a model already sharded by FSDP is not wrapped again, only the
        optimizer is prepared."""
        if cfg.compile:
            compile_blocks(model, compile_backend)
        run_model = model
        if cfg.fsdp:
            opt = accel.prepare(opt)
        else:
            run_model, opt = accel.prepare(run_model, opt)
        return cls(accel, run_model, model, opt, sched, ema, objective, cfg.grad_accum, cfg.grad_clip, cfg.fsdp,
                   cfg.attention, terms)

    def micro(self, inp: dict[str, Any], sync: bool = True, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Forward + loss + backward; `sync=False` skips the DDP all-reduce (inside grad accumulation).
        `inp`: make_inputs' tensors, and the conditioning's under "cond" (the model's keyword
        arguments). Returns the detached per-micro-batch means of `log_terms` (a device tensor)."""
        dev = self.accel.device
        x0, noise, t, drop = (inp[k].to(dev, non_blocking=True) for k in ("x0", "noise", "t", "drop"))
        cond = {k: _on_device(v, dev) for k, v in inp["cond"].items()}
        x_t = self.objective.add_noise(x0, noise, t)
        added = self._added_conditions(size, x0.shape[0]) if self.use_added else None
        with self._sync_context(sync), attention_kernels(self.attention):
            with self.accel.autocast():
                pred = self.run_model(x_t, t, **cond, drop=drop, added_cond_kwargs=added)
                losses = add_terms(self.objective.loss(pred, x0, x_t, noise, t), self.terms, inp)
                loss = losses["loss"].mean()
            self.accel.backward(loss / self.grad_accum)
        return torch.stack([losses[k].detach().mean() for k in self.log_terms])

    def _added_conditions(self, size: tuple[int, int], batch: int) -> dict[str, torch.Tensor]:
        """PixArt's size and aspect-ratio micro-conditions (1024 px models) of a micro-batch."""
        h, w = size
        dev = self.accel.device
        return {"resolution": torch.tensor([[h, w]] * batch, device=dev, dtype=torch.float32),
                "aspect_ratio": torch.tensor([[h / w]] * batch, device=dev, dtype=torch.float32)}

    def _sync_context(self, sync: bool):
        """Where gradients are not synchronised in this micro-batch (`sync=False`): FSDP is told,
        DDP skips its all-reduce inside `no_sync`."""
        if self.fsdp:
            sharding.set_gradient_sync(self.model, sync)
            return _null()
        return self.accel.no_sync(self.run_model) if not sync and self.accel.num_processes > 1 else _null()

    def update(self) -> torch.Tensor:
        """Clip, optimizer step, LR schedule, EMA; returns the grad norm before clipping (device tensor)."""
        if self.grad_clip > 0:
            grad_norm = self.accel.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.accel.device)
        if sharding.is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())
        return grad_norm


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def setup_optimization(cfg: TrainConfig, model, device):
    """Move `model` to `device` (gradient checkpointing on when asked; sharded with FSDP when
    cfg.fsdp) and build AdamW (fused on CUDA), the constant-with-warmup schedule and the EMA
    (foreach: one kernel per tensor group). Under FSDP the optimizer and EMA see the shards."""
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    model.to(device)
    if cfg.fsdp:
        sharding.shard_model(model)
    fused = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    return opt, sched, ema


def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator: DDP when launched on several processes (torchrun / accelerate
    launch); with cfg.fsdp the model is sharded by t2i.sharding instead and not wrapped in DDP."""
    from accelerate import Accelerator

    if os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch --use_fsdp`: shard with t2i.sharding (which keeps EMA and checkpoints
        # right) rather than accelerate's plugin, which would wrap the model behind our back
        cfg.fsdp = True
    # cpu=True on a machine without CUDA: only then does accelerate turn torchrun's
    # LOCAL_RANK/WORLD_SIZE into gloo ranks (MULTI_CPU); otherwise each rank would run alone
    accel = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if accel.num_processes == 1:
        cfg.fsdp = False  # nothing to shard over: one process trains as usual
    return accel


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
        self.stepper: TrainStep | None = None
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
                "config": asdict(self.cfg), **self.state_extra}

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
            weights = sharding.full_model_state(self.model)
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


def train_loop(run: Run, data, target: int, latent_hw: tuple[int, int], caption_channels: int, progress: bool) -> None:
    """Optimizer steps until `target`: grad_accum micro-batches each (an epoch's last step may
    have fewer), from the loader's batches of this rank; logs, checks and checkpoints as it goes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from t2i.loader import make_loader
    from t2i.models import device_peak_flops, flops_per_image, preset_of

    cfg, accel = run.cfg, run.accel
    flops_img = flops_per_image(preset_of(run.model.transformer.config), latent_hw, cfg.max_tokens, caption_channels,
                                cross_attention=run.conditioning.cross_attention)
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
            if run.step % cfg.log_every == 0 or run.step == target:
                now = time.perf_counter()
                ips = images / max(now - t_last, 1e-9)
                loss = log_step(run, last.grad_norm, ips, flops_img, peak)
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
        b = next(batches)
        share = len(b.keys)
        keys = sample_keys(cfg.seed, b.epoch, b.batch_pos, run.rank * share + np.arange(share))
        if run.trace is not None:
            fields = {"caption_fields": b.caption_fields} if len(cfg.caption_fields) > 1 else {}
            recovery.append_jsonl(run.trace, {"step": run.step + 1, "epoch": b.epoch, "batch": b.batch_pos, "rank": run.rank,
                                              "world": run.world, "keys": b.keys, **fields})
        run.epoch, run.batch_pos = b.epoch, b.batch_pos + 1
        inp = make_inputs(b, run.state_extra["scaling_factor"], stepper.objective, cfg.caption_dropout, keys)
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


def log_step(run: Run, grad_norm: torch.Tensor, ips: float, flops_img: float, peak: float | None) -> float:
    """Check the losses since the last line and append one log line (rank 0 writes); returns the loss."""
    run.check_finite()
    vals = torch.cat(run.window).mean(0).tolist()
    losses = dict(zip(run.stepper.log_terms, vals))  # the objective's terms (loss, mse, vb), then auxiliary ones
    rec = {"step": run.step, "epoch": run.epoch, **losses, "lr": run.sched.get_last_lr()[0], "grad_norm": float(grad_norm), "images_per_s": ips, "mfu": (ips * flops_img / peak) if peak else None,
           "params_local": run.params_local, "time": time.time()}
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
    # resume: whole tensors, the weights go in before FSDP shards the model, the EMA and
    # optimizer state after, split the way their parameters are
    names = [n for n, _ in model.named_parameters()]
    ck, st = (load_resume_weights(out, model, global_batch, accel.num_processes, local_batch, accel.is_main_process, cfg)
              if resume else (None, None))
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    extra = {"features": json.loads((fdir / "config.json").read_text()), "scaling_factor": vae.scaling,
             "vae_scale_factor": vae.spatial}
    run = Run(cfg, accel, out, model, names, sched, ema, global_batch, extra, conditioning)
    if ck is not None:
        restore_training_state(run, ck, st, opt)
    elif run.log_path.exists() and accel.is_main_process:
        run.log_path.unlink()
    run.stepper = TrainStep.prepare(cfg, accel, model, opt, sched, ema, objective)
    return run


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
    fdir = find_features(Path(features) if features is not None else out / "features", cfg)  # made beforehand: only opened
    with accel.main_process_first():  # rank 0 builds and caches the index (t2i.feature_index); the others load it
        data = StreamingFeatureDataset(fdir, cfg.max_tokens, cfg.caption_fields, cfg.caption_weights)
    ledger = Ledger(out, "train", accel.device)
    probe = data.get(np.array([0]))
    run = start_run(cfg, accel, out, fdir, probe, vae, conditioning, resume, global_batch, local_batch)
    target = cfg.steps if stop_after is None else min(cfg.steps, run.step + stop_after)
    summary: dict[str, Any] = {"out": str(out), "features": str(fdir), "samples": len(data), "start_step": run.step,
                               "skipped_images": failed_images(fdir), "world_size": accel.num_processes,
                               "global_batch": global_batch, "params_local": run.params_local}
    train_loop(run, data, target, tuple(probe.latent_mean.shape[-2:]), probe.text.shape[-1], progress)
    run.save()
    summary.update({"step": run.step, "epoch": run.epoch, "checkpoint": str(run.last_ck), "log": str(run.log_path)})
    done = run.step - summary["start_step"]
    summary["ledger"] = ledger.close(steps=done, images=done * local_batch * cfg.grad_accum)  # this rank's share
    run.trackers.finish(run.step, summary["ledger"])
    return summary
