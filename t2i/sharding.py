"""FSDP for the trainer: torch's FSDP2 (`fully_shard`) around each transformer block and the root.

Parameters, gradients, AdamW moments and the EMA become DTensors sharded over the processes, so
per-GPU memory for weights + optimizer + EMA falls with the number of GPUs. Checkpoints stay in
the one full (unsharded) format: every rank joins the gathers, rank 0 writes; a sharded run
loads a full checkpoint by splitting each tensor the way its parameter is split. So an FSDP run
resumes a DDP or 1-process checkpoint and the other way round.

Why torch's own fully_shard and not accelerate's FSDP plugin: accelerate enables FSDP only on
GPU-like devices, and the EMA (diffusers EMAModel) and our checkpoints need to see the DTensors
anyway. The Accelerator still sets up the process group, autocast and the optimizer wrapper.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_model(model: torch.nn.Module, mp_policy=None) -> torch.nn.Module:
    """Shard `model` (a PixArtWithNull) in place: one FSDP unit per transformer block (gathered
    just before it runs, freed after), then the root for the embedders, final layer and null caption.
    `mp_policy`: FSDP2's MixedPrecisionPolicy (t2i.precision), or None for the params' own dtype.
    On one process a block is not freed after its forward (there is nothing to gather it back
    from); the root keeps FSDP's default (kept until the backward: REPA's projector runs in the
    root's forward hook)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    for block in model.transformer.transformer_blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=dist.get_world_size() > 1)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(t: Any) -> bool:
    return isinstance(t, _dtensor())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), on CPU; others as they are."""
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor of `param`'s shape) split the way `param` is (collective when sharded)."""
    if not is_sharded(param):
        return value.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with whole CPU tensors (collective under FSDP)."""
    return {k: full(v) for k, v in model.state_dict().items()}


def full_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Whole CPU copies of `tensors` (e.g. the EMA's shadow parameters; collective under FSDP)."""
    return [full(t) for t in tensors]


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """opt.state_dict() with whole tensors: the same format as an unsharded optimizer's, so the
    checkpoint does not depend on how the run was sharded (collective under FSDP)."""
    sd = opt.state_dict()
    return {"state": {pid: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()} for pid, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full (unsharded) optimizer state into `opt`, whose parameters may be sharded."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        # per-parameter tensors (moments) follow the parameter; scalars like `step` stay whole
        state[pid] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Skip (sync=False) or do the gradient reduce-scatter of the next backward (grad accumulation)."""
    model.set_requires_gradient_sync(sync)
