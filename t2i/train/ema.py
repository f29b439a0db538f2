"""The trainer's EMA: diffusers' EMAModel, optionally averaged only every k-th optimizer step
(`ema_every`, issue 33), the one pass in k standing for k steps.

`optimization_step` keeps its meaning (optimizer steps taken, what checkpoints save as "ema_step"
and resume restores), and the EMA moves on the steps that are a multiple of k, so which steps
move it depends on the global step alone: a resumed run moves it on the same steps as one that
never stopped. The decay of such a step is the product of the per-step decays diffusers gives
the k optimizer steps it stands for (its warm-up ramp included): decay**k once the ramp reached
`decay`, and exactly k per-step updates whenever the weights did not change in between."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from diffusers.training_utils import EMAModel


class StridedEMA(EMAModel):
    """diffusers' EMAModel, averaged on every `every`-th optimizer step only (1: every step, as
    EMAModel). `step()` is called once per optimizer step as before."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], every: int = 1, **kwargs) -> None:
        super().__init__(parameters, **kwargs)
        self.every = int(every)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the update at `optimization_step`: that of the `every` optimizer steps
        (optimization_step - every, optimization_step] it stands for."""
        per_step = super().get_decay
        if self.every == 1:
            return per_step(optimization_step)
        return math.prod(per_step(s) for s in range(optimization_step - self.every + 1, optimization_step + 1))

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Count one optimizer step; average when its number is a multiple of `every`."""
        if (self.optimization_step + 1) % self.every:
            self.optimization_step += 1  # the next update (a multiple of `every`) stands for this step too
            return
        super().step(parameters)
