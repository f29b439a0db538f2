"""The settings of `t2i-data plan` (`PlanOptions`), parsed from the flags' text and checked before
any work: MFU rules, image counts, a gpu_bench report, the ranges of the numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.checks import Range, check_output_dir, check_ranges, read_text_input
from shards.errors import UserError
from shards.ledger import GRID_GCO2_KWH, PUE  # the defaults every run's ledger uses

# Feature encoders (H100 gpu_bench run 1, bf16): SD-VAE encoder 272.7 GFLOP per 256 px image at 19.1% MFU,
# T5-XXL encoder 1,117 GFLOP per 120-token caption at 33.3% MFU.
FEATURES = {"resolution": 256, "tokens": 120, "vae_gflop_per_image": 272.72, "vae_mfu": 0.191,
            "t5_gflop_per_caption": 1116.99, "t5_mfu": 0.333}


@dataclass
class MfuRule:
    """`--mfu 0.3,1024=0.07,align=0.25`: a default, per-resolution and per-stage values."""

    default: float | None = None
    by_resolution: dict[int, float] = field(default_factory=dict)
    by_stage: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> "MfuRule":
        rule = cls()
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            key, _, value = part.rpartition("=")
            v = _fraction(value, f"--mfu {part!r}")
            if not key:
                rule.default = v
            elif key.isdigit():
                rule.by_resolution[int(key)] = v
            else:
                rule.by_stage[key] = v
        return rule

    def lookup(self, stage: str, resolution: int) -> float | None:
        return self.by_stage.get(stage, self.by_resolution.get(resolution, self.default))


def _fraction(value: str, where: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise UserError(f"{where}: {value!r} is not a number: give MFU as a fraction, e.g. 0.3") from None
    if not 0 < v <= 1:
        raise UserError(f"{where}: MFU {v} is not in (0, 1]: give it as a fraction, e.g. 0.3 for 30%")
    return v


def parse_count(text: str) -> float:
    """'10M' -> 1e7, '14k' -> 14000, '2.5e6' -> 2.5e6."""
    mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}
    t = text.strip().lower()
    try:
        n = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise UserError(f"image count {text!r} is not a number: write e.g. 10M, 500k or 1200") from None
    if not IMAGE_COUNT.holds(n):
        raise UserError(f"image count {text!r} is out of range: pass {IMAGE_COUNT.describe(False)}, e.g. 10M")
    return n


def parse_images(text: str | None) -> dict[str, float]:
    """`sam=10M,aesthetic=14M` -> {"sam": 1e7, "aesthetic": 1.4e7}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, count = part.partition("=")
        if not sep or not name:
            raise UserError(f"--images {part!r} is not NAME=COUNT: write e.g. sam=10M,aesthetic=14M")
        out[name.strip()] = parse_count(count)
    return out


IMAGE_COUNT = Range(1, 1e13)  # images per dataset
PLAN_RANGES = {"price": Range(0, 1e4), "caption_rate": Range(0, 1e6, lo_open=True), "gpus": Range(1, 10**6),
               "grid_gco2_kwh": Range(0, 5000), "pue": Range(1, 10)}


@dataclass
class PlanOptions:
    """Every setting of a plan (the plan command's flags map 1:1). `images`, `mfu`, `gpu_bench`
    and `captioned` also take the flags' text: "sam=10M,aesthetic=14M", "0.3,1024=0.1", a JSON
    file, "sam,aesthetic"."""

    gpu: str = "A100-80GB"
    images: dict[str, float] | str | None = field(default_factory=dict)  # dataset name -> images (captioning, features)
    price: float | None = None  # $ per GPU-hour
    mfu: MfuRule | str | None = field(default_factory=MfuRule)
    gpu_bench: dict[str, Any] | str | Path | None = None  # a benchmarks/gpu_bench.py report
    caption_rate: float | None = None  # captioner images/s per GPU on the planned GPU
    captioned: list[str] | str | None = None  # datasets to caption (default: all of `images`)
    gpus: int | None = None  # GPUs for stages without `gpus`, and for captioning / features
    grid_gco2_kwh: float = GRID_GCO2_KWH
    pue: float = PUE
    out: Path | None = None  # write plan.json and plan.md here
    json_out: bool = False  # print JSON instead of Markdown

    def validate(self) -> None:
        """A UserError for a number out of range, or an --out that cannot be written (before any work)."""
        check_ranges(self, PLAN_RANGES)
        if self.out is not None:
            check_output_dir(self.out)

    def __post_init__(self) -> None:
        if self.images is None or isinstance(self.images, str):
            self.images = parse_images(self.images)
        if self.mfu is None or isinstance(self.mfu, str):
            self.mfu = MfuRule.parse(self.mfu)
        if isinstance(self.gpu_bench, (str, Path)):
            self.gpu_bench = load_gpu_bench(self.gpu_bench)
        if isinstance(self.captioned, str):
            self.captioned = [c.strip() for c in self.captioned.split(",") if c.strip()]


def load_gpu_bench(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    text = read_text_input(p, "--gpu-bench", "pass a benchmarks/gpu_bench.py report")
    try:
        report = json.loads(text)
    except ValueError as e:
        raise UserError(f"--gpu-bench {p}: cannot read it as JSON ({e}): pass a benchmarks/gpu_bench.py report") from None
    if not isinstance(report, dict) or not isinstance(report.get("results", []), list):
        raise UserError(f"--gpu-bench {p} has no results list: pass a benchmarks/gpu_bench.py report")
    return report


def feature_rates(opts: PlanOptions) -> tuple[dict[str, Any], str]:
    """The encoders' FLOPs and MFU (FEATURES' keys) and where they come from: FEATURES ("assumed"),
    or a --gpu-bench's ("measured"): the features job's best measured path (its "features-best":
    layout, compile, text dtype; issue 33) over the bare encoders (its "features")."""
    bench = opts.gpu_bench or {}
    best = bench.get("features-best") or {}
    measured = {**(bench.get("features") or {}), **(best if "vae_mfu" in best else {})}
    return {**FEATURES, **measured}, ("measured" if measured else "assumed")
