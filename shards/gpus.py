"""The GPU table the planner prices a recipe on: dense 16-bit tensor-core peak, board power and memory
bandwidth, from the vendors' datasheets (SXM boards unless the name says PCIe).

Peaks are *dense* (no 2:4 sparsity) bf16/fp16 FLOP/s with fp32 accumulate: the figure MFU is
measured against. V100 has no bf16; its fp16 peak is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shards.errors import UserError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    watts: float  # board power (TDP / max TGP)
    mem_gbps: float  # memory bandwidth, GB/s (captioning, a decode-bound job, scales with it)
    arch: str


GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS tensor (fp16), 300 W, 900 GB/s
    GPU("V100", 125e12, 300, 900, "volta"),
    # NVIDIA A100 datasheet (SXM4): bf16 tensor 312 TFLOPS dense (624 sparse), 400 W; 1,555 GB/s (40GB), 2,039 GB/s (80GB)
    GPU("A100-40GB", 312e12, 400, 1555, "ampere"),
    GPU("A100-80GB", 312e12, 400, 2039, "ampere"),
    # NVIDIA H100 datasheet: SXM 989 TFLOPS bf16 dense (1,979 sparse), 700 W, 3.35 TB/s; PCIe 756 TFLOPS, 350 W, 2.0 TB/s
    GPU("H100", 989e12, 700, 3350, "hopper"),
    GPU("H100-PCIe", 756e12, 350, 2000, "hopper"),
    # NVIDIA H200 datasheet (SXM): 989 TFLOPS bf16 dense, up to 700 W, 4.8 TB/s
    GPU("H200", 989e12, 700, 4800, "hopper"),
    # NVIDIA L40S datasheet: 362 TFLOPS bf16 dense (733 sparse), 350 W, 864 GB/s
    GPU("L40S", 362e12, 350, 864, "ada"),
    # NVIDIA Ada architecture whitepaper, RTX 4090: 165.2 TFLOPS fp16/bf16 with fp32 accumulate (dense), 450 W, 1,008 GB/s
    GPU("RTX-4090", 165.2e12, 450, 1008, "ada"),
)}

ALIASES = {"a100": "A100-80GB", "h100sxm": "H100", "h100-sxm": "H100", "4090": "RTX-4090", "rtx4090": "RTX-4090",
           "h200sxm": "H200", "v100sxm2": "V100"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def get_gpu(name: str) -> GPU:
    """The GPU called `name` (case, spaces, '-' and '_' ignored), or a UserError listing the known ones."""
    by_norm = {_norm(k): g for k, g in GPUS.items()} | {_norm(k): GPUS[v] for k, v in ALIASES.items()}
    gpu = by_norm.get(_norm(name))
    if gpu is None:
        raise UserError(f"unknown GPU {name!r}: use one of {', '.join(GPUS)}")
    return gpu


def match_device_name(device_name: str) -> GPU | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    n = _norm(device_name)
    for key in ("H200", "H100", "A100", "V100", "L40S", "4090"):
        if _norm(key) in n:
            if key == "A100":
                return GPUS["A100-40GB" if "40gb" in n else "A100-80GB"]
            if key == "H100" and "pcie" in n:
                return GPUS["H100-PCIe"]
            return get_gpu(key)
    return None
