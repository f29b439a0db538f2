"""The PixArt-alpha trainer (DiT/nanoGPT style) on diffusers + accelerate.

    from t2i.train import TrainConfig, train
    train(TrainConfig(preset="PixArt-tiny/2", resolution=16, vae="tiny/vae", text_encoder="tiny/t5",
                      steps=200), out="runs/tiny", features="feats/")

The loop trains on a features directory (t2i.features; t2i.stage.run_stage computes it from
caption shards first, as its own step); it samples latents from the stored posterior (mean +
std * noise), drops 10% of captions to the learned null caption (the stage's conditioning,
t2i.conditioning), trains with its objective (t2i.objective: DDPM with the IDDPM hybrid loss, or flow
matching), optionally routing tokens past the middle blocks (t2i.routing) and aligning an early
block with a frozen teacher's stored patch tokens (REPA, t2i.repa), and
writes checkpoints (t2i.checkpoint) that `--resume` continues from exactly: same data order,
same noise, same losses.

Modules, by concern: `config` (TrainConfig and the checks before any work), `resume` (the
features directory for the settings, resuming from a checkpoint and what must match), `step`
(a micro-batch's inputs, TrainStep, optimizer and accelerator), `validate` (the validation loss on
held-out keys) and `loop` (Run, the loop, train).
"""

import importlib
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(("TrainConfig", "TrainRun", "check_resolution", "per_process_batch", "preflight"), "config"),
    **dict.fromkeys(("Run", "TrainingDiverged", "log_step", "train", "train_loop", "train_step"), "loop"),
    **dict.fromkeys(("check_caption_settings", "check_resume_features", "find_features", "load_resume_weights",
                     "restore_training_state"), "resume"),
    **dict.fromkeys(("TrainStep", "make_accelerator", "make_inputs", "setup_optimization"), "step"),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Each name from its module when first asked for: `from t2i.train import TrainConfig` reads
    the config without importing torch (the CLI's --help shows its defaults); the loop's names
    bring the rest."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 't2i.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"t2i.train.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
