"""How a training stage holds and multiplies its weights, beyond autocast (issue 33's step levers).

- `param_dtype = "bfloat16"`: the forward and backward run on bf16 copies of the weights, so the
  residual stream between blocks and every activation is bf16 (half the bytes of autocast's fp32
  stream), while AdamW, the EMA and checkpoints keep fp32 master weights. This is torch FSDP2's
  MixedPrecisionPolicy (bf16 params, gradients reduced in fp32) over t2i.sharding, on one
  process too (a one-rank process group): the library holds the master copy, not this code.
- `float8 = True`: the transformer blocks' linear layers multiply in float8 (torchao's
  Float8Linear, dynamic per-tensor scales; the `fp8` extra). Their weights and state-dict keys
  stay as they are, so checkpoints, sampling and export do not change.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from shards.errors import UserError

PARAM_DTYPES = ("float32", "bfloat16")


def check_precision(settings: Any) -> None:
    """A UserError for a param_dtype or float8 setting this run cannot honour (`settings`: a TrainConfig)."""
    if settings.param_dtype not in PARAM_DTYPES:
        raise UserError(f"param_dtype {settings.param_dtype!r} is not one of {', '.join(PARAM_DTYPES)}: pick one")
    if settings.param_dtype == "bfloat16":
        if settings.mixed_precision != "bf16":
            raise UserError(f"param_dtype bfloat16 runs under bf16 autocast, but mixed_precision is "
                            f"{settings.mixed_precision!r}: set mixed_precision = \"bf16\" (--mixed-precision bf16)")
        if settings.lora_rank:
            raise UserError("param_dtype bfloat16 with lora_rank: a LoRA stage trains a few MB of adapter; "
                            "keep param_dtype float32 (its frozen base already runs under autocast)")
    if settings.float8 and importlib.util.find_spec("torchao") is None:
        raise UserError("float8 needs torchao: pip install 't2i-data[fp8]', or drop --float8")


def bf16_params(settings: Any) -> bool:
    """Whether the stage computes on bf16 copies of fp32 master weights (FSDP2's mixed precision)."""
    return settings.param_dtype == "bfloat16"


def mp_policy(settings: Any):
    """FSDP2's MixedPrecisionPolicy for `settings` (None: the parameters' own dtype)."""
    if not bf16_params(settings):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def one_process_group() -> None:
    """A one-rank process group, for FSDP2's mixed precision on a single process (nothing when
    one exists: torchrun's, or an earlier stage's in this process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _float8_eligible(module: torch.nn.Module, fqn: str) -> bool:
    """Linear layers inside the transformer blocks whose sizes float8 matmuls take (multiples of 16)."""
    return ("transformer_blocks." in fqn and isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_float8(model: torch.nn.Module) -> int:
    """Swap the blocks' eligible linear layers for torchao's Float8Linear in place; returns how many."""
    from torchao.float8 import convert_to_float8_training

    before = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=_float8_eligible)
    swapped = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    if not swapped:
        raise UserError(f"float8: none of the model's {before} linear layers has sizes that are multiples of 16; "
                        "drop --float8 for this preset")
    return swapped
