"""Experiment trackers for `train --report-to`: accelerate's own tracker classes (TensorBoard, W&B,
MLflow), fed the same rows as log.jsonl (loss, mse, vb, lr, grad norm, images/s, MFU), a grid of
samples at every checkpoint when `sample_prompts` is set ('|'-separated; written to
`<out>/samples/step-N.png` with or without a tracker), and, at the end, the run's ledger
(device-hours, kWh, kgCO2e).

Where they write: TensorBoard event files in `<out>/trackers/<stage name>/` (works offline); MLflow a
file store in `<out>/mlruns` unless MLFLOW_TRACKING_URI is set; W&B its project `<stage name>`,
offline too with WANDB_MODE=offline. Only the main process logs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.errors import UserError

KNOWN = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def parse_report_to(text: str) -> list[str]:
    """'tensorboard,mlflow' -> ['tensorboard', 'mlflow']; a UserError for an unknown name."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip() and n.strip().lower() != "none"]
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise UserError(f"unknown tracker {', '.join(unknown)} in report_to: use one or more of {', '.join(KNOWN)} (comma-separated)")
    return names


def check_report_to(text: str) -> None:
    """A UserError for an unknown tracker or one whose package is missing (before any work starts)."""
    for name in parse_report_to(text):
        _check_installed(name)


def _check_installed(name: str) -> None:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    ok = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}[name]()
    if not ok:
        raise UserError(f"report_to {name}: the {PACKAGES[name]} package is not installed: pip install {PACKAGES[name]}")


def _make(name: str, run_name: str, out: Path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        return cls(run_name, out / "trackers")
    if name == "mlflow":
        import os

        return cls(run_name, logging_dir=None if os.environ.get("MLFLOW_TRACKING_URI") else str(out / "mlruns"))
    return cls(run_name, dir=str(out))


class Trackers:
    """The trackers of one training stage; every method is a no-op when none were asked for or
    on a process other than the main one."""

    def __init__(self, report_to: str, out: str | Path, run_name: str, config: dict[str, Any], main: bool = True) -> None:
        check_report_to(report_to)
        names = parse_report_to(report_to)
        self.trackers = [_make(n, run_name, Path(out)) for n in names] if main else []
        self.main = main
        self.out = Path(out)
        self.prompts = [p.strip() for p in str(config.get("sample_prompts", "")).split("|") if p.strip()]
        hparams = {k: v for k, v in config.items() if isinstance(v, (bool, str, int, float))}
        for t in self.trackers:
            t.start()
            t.store_init_configuration(hparams)

    def log(self, record: dict[str, Any], step: int) -> None:
        """The numeric values of a log.jsonl row at `step`."""
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        for t in self.trackers:
            t.log(values, step=step)

    def samples(self, checkpoint: str | Path, step: int) -> None:
        """Sample the prompts from `checkpoint` (EMA weights, 20 steps, through the conditioning it
        was trained with: t2i.conditioning) into `<out>/samples/step-N.png`, with or without
        trackers, and log the grid to each tracker. On a GPU a text-to-image pipeline is loaded in
        bf16 next to the training state and freed afterwards."""
        if not self.main or not self.prompts:
            return
        import numpy as np
        import torch

        from t2i.kinds import checkpoint_conditioning
        from t2i.pipeline import image_grid

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        grid = image_grid(checkpoint_conditioning(checkpoint).images(checkpoint, self.prompts, dtype=dtype)).convert("RGB")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = self.out / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for t in self.trackers:
            if t.name == "tensorboard":
                t.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif t.name == "wandb":
                t.log_images({"samples": [grid]}, step=step)
            else:  # mlflow: the PNG as an artifact
                t.log_artifact(str(path), "samples")

    def finish(self, step: int, ledger: dict[str, Any] | None = None) -> None:
        """Log the ledger's totals (as ledger/*) at the last step and close the trackers."""
        if ledger:
            self.log({f"ledger/{k}": ledger[k] for k in ("device_hours", "energy_kwh", "kg_co2e")}, step)
        for t in self.trackers:
            t.finish()
