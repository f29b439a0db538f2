"""The validation loss: the objective's loss on keys held out of training (`val_fraction` or
`val_keys`, chosen by key hash: t2i.data.Holdout), every `val_every` steps, into log.jsonl and
the trackers (`val_loss`, and `val_<term>` for the objective's other terms).

Each held-out sample is scored at `val_timesteps` timesteps, stratified over the objective's own
timestep density (the j-th at quantile (j + v) / k, v the sample's own offset), with noise and
posterior draws from its key alone (t2i.noise.string_hashes of the key, never the step, the
seed or its place in a batch): the same numbers at every validation, so the curve moves only with the model.
No caption dropout, no token routing, the training weights (not the EMA).

On several processes the held-out samples are split like a global batch (each rank scores its
slice of every chunk) and the per-sample losses gathered and summed in one order on every rank,
so 1 or N processes, a rerun and a resumed run give the same value (to float rounding of the
per-sample forwards).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from t2i.noise import derive_keys, normal_pairs, random_words, uniforms

VAL_STREAM = 0x76616C  # the index (t2i.noise.derive_keys) of the validation streams of a key ("val")


def stratified_words(keys: np.ndarray, j: int, k: int) -> np.ndarray:
    """One random word per sample whose uniform (t2i.noise.uniforms) is (j + v) / k, v the sample's
    own offset in [0, 1): the j-th of k stratified draws from any density the objective maps words to."""
    v = uniforms(random_words(keys, 1)[:, 0])
    u = (j + v) / k
    return np.floor(u * (1 << 53)).astype(np.uint64) << np.uint64(11)


def val_inputs(b, scaling: float, objective, keys: np.ndarray, j: int, k: int) -> dict[str, torch.Tensor]:
    """The micro-batch inputs of validation draw j of k: posterior draw and noise from the j-th
    stream of each sample's key, timesteps stratified (`stratified_words`), no caption dropped."""
    shape = tuple(b.latent_mean.shape[1:])
    eps, noise = (torch.from_numpy(z).view(len(keys), *shape) for z in normal_pairs(derive_keys(keys, j), math.prod(shape)))
    x0 = b.latent_mean.float() + b.latent_std.float() * eps
    return {"x0": x0 * scaling, "noise": noise, "t": objective.draw_timesteps(stratified_words(keys, j, k)),
            "drop": torch.zeros(len(keys), dtype=torch.bool)}


def val_chunks(data, global_batch: int, world: int) -> list[np.ndarray]:
    """The held-out samples in chunks of at most `global_batch`, one bucket each, each padded
    with -1 to a multiple of `world` (key order within a bucket, buckets in size order)."""
    held = data.val_indices
    chunks = []
    buckets = data.bucket_of[held]
    for b in np.unique(buckets):
        mine = held[buckets == b]
        for s in range(0, len(mine), global_batch):
            c = mine[s : s + global_batch]
            chunks.append(np.concatenate([c, np.full(-len(c) % world, -1)]))
    return chunks


class Validation:
    """The validation of a run: `due(step)`, then `measure()` returns {"val_loss": ..., ...}."""

    def __init__(self, data, cfg, run: Any) -> None:
        self.data, self.run = data, run
        self.every = cfg.val_every or cfg.checkpoint_every
        self.timesteps = cfg.val_timesteps
        self.chunks = val_chunks(data, run.global_batch, run.world)

    def due(self, step: int) -> bool:
        """Whether a validation follows optimizer step `step`."""
        return bool(self.chunks) and step % self.every == 0

    def run_chunk(self, chunk: np.ndarray) -> torch.Tensor:
        """(B, terms + 1): this rank's slice of a chunk, each sample's mean losses over its
        timesteps and, last, 1 for a real sample (0: padding)."""
        run, stepper = self.run, self.run.stepper
        share = len(chunk) // run.world
        mine = chunk[run.rank * share : (run.rank + 1) * share]
        idx = np.where(mine >= 0, mine, chunk[0])  # padding re-reads the chunk's first sample, masked out
        b = run.text(self.data.get(idx))  # text_dtype ids: encoded on the device (t2i.text_ondemand)
        keys = derive_keys(self.data.val_hashes[np.searchsorted(self.data.val_indices, idx)], VAL_STREAM)
        total = 0
        for j in range(self.timesteps):
            inp = val_inputs(b, run.state_extra["scaling_factor"], stepper.objective, keys, j, self.timesteps)
            inp["cond"] = run.conditioning.inputs(b)
            losses = stepper.evaluate(inp, size=(b.height, b.width))
            total = total + torch.stack([losses[k].float() for k in stepper.objective.terms], 1)
        valid = torch.from_numpy(mine >= 0).float().to(total.device)[:, None]
        return torch.cat([total / self.timesteps, valid], 1)

    def measure(self) -> dict[str, float]:
        """The validation loss of the model as it is now (every rank takes part)."""
        run = self.run
        was_training = run.model.training
        run.model.eval()
        try:
            rows = [self.run_chunk(chunk) for chunk in self.chunks]
            rows = [run.accel.gather(r) if run.world > 1 else r for r in rows]  # rank order: the chunk's order
        finally:
            run.model.train(was_training)
        table = torch.cat(rows).double().cpu()
        means = table[table[:, -1] > 0, :-1].mean(0).tolist()
        return {f"val_{k}": v for k, v in zip(run.stepper.objective.terms, means)}
