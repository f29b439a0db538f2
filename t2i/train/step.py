"""The step mechanics: a micro-batch's inputs (`make_inputs`: per-sample keyed noise), the
forward + loss + backward and the update (`TrainStep`), and the accelerator, optimizer, schedule
and EMA they run on. What the model is conditioned on comes from t2i.conditioning, what it is
trained to output and the loss from t2i.objective: nothing here depends on either's kind."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from t2i import precision, sharding
from t2i.lora import trainable
from t2i.models import attention_kernels, compile_blocks
from t2i.noise import normal_pairs, random_words, uniforms
from t2i.objective import LossTerm, Objective, add_terms
from t2i.routing import TokenDrop, routing
from t2i.train.config import TrainConfig


def make_inputs(b, scaling: float, objective: Objective, caption_dropout: float, keys,
                token_drop: TokenDrop = TokenDrop()) -> dict[str, torch.Tensor | None]:
    """CPU tensors of one micro-batch: x0 drawn from the stored posterior, noise, timesteps (the
    objective's draw), caption-drop flags and the tokens routing keeps ("keep", None without
    token dropping), each sample's from its own noise key (keys[i], t2i.noise.sample_keys), all
    samples in one batched draw."""
    shape = tuple(b.latent_mean.shape[1:])
    words = random_words(keys, 2)  # each stream: timestep, caption drop, then the normals, then the routing
    eps, noise = (torch.from_numpy(z).view(len(words), *shape) for z in normal_pairs(keys, math.prod(shape), first=2))
    x0 = b.latent_mean.float() + b.latent_std.float() * eps  # the posterior draw; stored maybe in 16 bits
    return {"x0": x0 * scaling, "noise": noise, "t": objective.draw_timesteps(words[:, 0]),
            "drop": torch.from_numpy(uniforms(words[:, 1]) < caption_dropout),
            "keep": token_drop.keep(keys, shape, first=2 + math.prod(shape))}


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
                 grad_clip: float = 0.0, fsdp: bool = False, attention: str = "auto", terms: Sequence[LossTerm] = (),
                 token_drop: TokenDrop = TokenDrop()) -> None:
        self.accel, self.run_model, self.model = accel, run_model, model
        self.opt, self.sched, self.ema, self.objective = opt, sched, ema, objective
        self.grad_accum, self.grad_clip, self.fsdp, self.attention = grad_accum, grad_clip, fsdp, attention
        self.terms = tuple(terms)
        self.token_drop = token_drop  # which tokens a micro-batch routes past the middle blocks (make_inputs' "keep")
        self.log_terms = tuple(objective.terms) + tuple(t.name for t in self.terms)  # what micro() returns, in order
        self.use_added = getattr(model.transformer, "use_additional_conditions", False)  # a DiT has none
        self.params = [p for _, p in trainable(model)]  # what trains: all, or a LoRA stage's adapter

    @classmethod
    def prepare(cls, cfg: TrainConfig, accel, model, opt, sched, ema, objective: Objective,
                compile_backend: str = "inductor", terms: Sequence[LossTerm] = (),
                token_drop: TokenDrop = TokenDrop()) -> "TrainStep":
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
                   cfg.attention, terms, token_drop)

    def micro(self, inp: dict[str, Any], sync: bool = True, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Forward + loss + backward; `sync=False` skips the DDP all-reduce (inside grad accumulation).
        `inp`: make_inputs' tensors, and the conditioning's under "cond" (the model's keyword
        arguments). Returns the detached per-micro-batch means of `log_terms` (a device tensor)."""
        x0, noise, t, x_t, kwargs = self._model_inputs(inp, size)
        with self._sync_context(sync), attention_kernels(self.attention), routing(self.model, inp.get("keep")):
            with self.accel.autocast():
                pred = self.run_model(x_t, t, **kwargs)
                losses = add_terms(self.objective.loss(pred, x0, x_t, noise, t), self.terms, inp)
                loss = losses["loss"].mean()
            self.accel.backward(loss / self.grad_accum)
        return torch.stack([losses[k].detach().mean() for k in self.log_terms])

    @torch.no_grad()
    def evaluate(self, inp: dict[str, Any], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """The objective's per-sample losses of a micro-batch, without gradients, every token
        through every block (the validation loss; the model is called as it is, outside DDP)."""
        x0, noise, t, x_t, kwargs = self._model_inputs(inp, size)
        with attention_kernels(self.attention), self.accel.autocast():
            return self.objective.loss(self.model(x_t, t, **kwargs), x0, x_t, noise, t)

    def _model_inputs(self, inp: dict[str, Any], size: tuple[int, int] | None):
        """(x0, noise, t, x_t, the model's keyword arguments) of a micro-batch, on the device."""
        dev = self.accel.device
        x0, noise, t, drop = (inp[k].to(dev, non_blocking=True) for k in ("x0", "noise", "t", "drop"))
        cond = {k: _on_device(v, dev) for k, v in inp["cond"].items()}
        added = self._added_conditions(size, x0.shape[0]) if self.use_added else None
        return x0, noise, t, self.objective.add_noise(x0, noise, t), {**cond, "drop": drop, "added_cond_kwargs": added}

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
            grad_norm = self.accel.clip_grad_norm_(self.params, self.grad_clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.accel.device)
        if sharding.is_sharded(grad_norm):
            grad_norm = grad_norm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return grad_norm


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def setup_optimization(cfg: TrainConfig, model, device):
    """Move `model` to `device` (gradient checkpointing on when asked; float8 linears when
    cfg.float8; sharded with FSDP, in cfg.param_dtype's mixed precision, when cfg.fsdp) and build
    AdamW (fused on CUDA), the constant-with-warmup schedule and the EMA (foreach: one kernel per
    tensor group; averaged every cfg.ema_every steps, t2i.train.ema), over the parameters that
    train (a LoRA stage's: the adapter alone). Under FSDP the optimizer and EMA see the shards."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    from t2i.train.ema import StridedEMA

    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    if cfg.float8:
        precision.convert_float8(model.transformer)
    model.to(device)
    if cfg.fsdp:
        sharding.shard_model(model, precision.mp_policy(cfg))
    fused = torch.device(device).type == "cuda"
    params = [p for _, p in trainable(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    ema = StridedEMA(params, every=cfg.ema_every, decay=cfg.ema_decay, foreach=True)
    return opt, sched, ema


def _own_mixed_precision(mixed_precision: str) -> None:
    """Let this stage's Accelerator take its own mixed precision when an earlier stage of the same
    process (a manifest's stages, the demo's) set another: accelerate keeps one shared state per
    process and refuses a change. Only that state is dropped; the process group stays."""
    from accelerate.state import AcceleratorState

    before = AcceleratorState._shared_state.get("_mixed_precision")
    if before is not None and before != mixed_precision:
        AcceleratorState._reset_state()


def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator: DDP when launched on several processes (torchrun / accelerate
    launch); with cfg.fsdp the model is sharded by t2i.sharding instead and not wrapped in DDP."""
    from accelerate import Accelerator

    if os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # `accelerate launch --use_fsdp`: shard with t2i.sharding (which keeps EMA and checkpoints
        # right) rather than accelerate's plugin, which would wrap the model behind our back
        cfg.fsdp = True
    _own_mixed_precision(cfg.mixed_precision)
    # cpu=True on a machine without CUDA: only then does accelerate turn torchrun's
    # LOCAL_RANK/WORLD_SIZE into gloo ranks (MULTI_CPU); otherwise each rank would run alone
    accel = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if precision.bf16_params(cfg):
        cfg.fsdp = True  # FSDP2's mixed precision holds the fp32 master weights
        if accel.num_processes == 1:
            precision.one_process_group()
    elif accel.num_processes == 1:
        cfg.fsdp = False  # nothing to shard over: one process trains as usual
    return accel
