"""One training stage as two steps: features from caption shards, then training on them.

    summary = run_stage(cfg, "runs/align", shards="captions/")            # features, then train
    summary = run_stage(cfg, "runs/align", features="feats/")             # train on existing features

The features step is t2i.features.compute_features, run on its own (its progress bar, summary
and ledger in the features directory), data-parallel over the processes the stage was launched
on (torchrun / accelerate launch: each rank encodes its share of the keys). The training loop
(t2i.train.train) then only opens the features directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.lock import ensure_output_dir
from t2i import recovery
from t2i.kinds import conditioning_class
from t2i.features import compute_features
from t2i.ranks import Ranks
from t2i.train import TrainConfig, check_resume_features, preflight, train


def launched_ranks() -> Ranks:
    """This process's rank among the processes torchrun / accelerate launch started, in the
    process group accelerate sets up (the one the training loop then uses)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as t2i.train.make_accelerator
    return Ranks(state.process_index, state.num_processes)


def features_step(cfg: TrainConfig, shards: str | Path, root: str | Path, progress: bool = True) -> dict[str, Any]:
    """Encode the caption shards for `cfg`'s settings into `root/<cache key>/` (what is already
    there is kept); returns compute_features' summary."""
    return compute_features(shards, root, cfg.feature_config(), progress=progress, ranks=launched_ranks())


def run_stage(cfg: TrainConfig, out: str | Path, shards: str | Path | None = None, features: str | Path | None = None,
              resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Features from `shards` (when given) into the features root `features` (default
    `<out>/features`), then train on them (a class-cond stage also takes its labels from
    `shards`). Returns train's summary with the features step's summary under "features_step"
    (absent without `shards`)."""
    out = Path(out)
    root = Path(features) if features is not None else out / "features"
    ensure_output_dir(out)  # a path under a file, read-only or full: one line before any model loads
    step = None
    if shards is not None:
        preflight(cfg)  # bad settings or a finished run fail before hours of features, not after
        recovery.refuse_fresh_run_into_old(out, resume)
        if resume:
            check_resume_features(out, cfg)  # a changed feature dtype: before features are made for it
        conditioning_class(cfg.kind).check_shards(cfg, shards)  # so do shards it cannot read (a label column)
        step = features_step(cfg, shards, root, progress)
    summary = train(cfg, out, features=root, resume=resume, stop_after=stop_after, progress=progress, label_shards=shards)
    if step is not None:
        summary["features_step"] = {k: v for k, v in step.items() if k != "ledger"}
    return summary
