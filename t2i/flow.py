"""The flow-matching objective (rectified flow; a t2i.objective.Objective, `objective = "flow"`).

    x_t = (1 - t) x0 + t eps,   the model predicts v = eps - x0,   at model timestep 1000 t

as SD3 and Sana train. t in [0, 1) is drawn per sample from that sample's own random word
(t2i.noise), through one of the densities of SD3 (Esser et al. 2024):
- "uniform": t = u;
- "logit_normal": t = sigmoid(m + s * Phi^-1(u)) (`logit_mean` m, `logit_std` s; SD3: 0, 1),
  through the inverse normal CDF of the sample's uniform, so a draw is a pure function of the
  word (identical on any number of processes and after a resume);
then SD3's resolution shift t' = shift t / (1 + (shift - 1) t) (`flow_shift`, 1: none; Sana
uses 3), which puts more of the draws on the noisy end, where larger images need them.

Loss weightings (`loss_weighting`): "none", or SD3's "sigma_sqrt" (1 / t^2, with t clamped
below at SIGMA_SQRT_FLOOR, since the formula is unbounded at t -> 0) and "cosmap"
(2 / (pi (1 - 2t + 2t^2))), as diffusers' compute_loss_weighting_for_sd3 computes them.

The sampler is diffusers' DPM-Solver++ in its flow form (DPMSolverMultistepScheduler with
prediction_type "flow_prediction", use_flow_sigmas and the same `flow_shift`): a scheduler that
PixArtAlphaPipeline can drive (it has scale_model_input and init_noise_sigma) and that a pipeline
folder records, so an exported flow model samples in diffusers with no t2i code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from shards.errors import UserError
from t2i.noise import uniforms

DENSITIES = ("uniform", "logit_normal")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000  # model timestep = 1000 t, as diffusers' flow schedulers
SIGMA_SQRT_FLOOR = 0.01  # sigma_sqrt's weight 1 / t^2 is capped at 1e4


def flow_times(u: np.ndarray, density: str = "uniform", mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> np.ndarray:
    """t in [0, 1) (float64) for uniforms `u`: the density's quantile of u, then the shift."""
    u = np.asarray(u, np.float64)
    if density == "logit_normal":
        n = mean + std * torch.special.ndtri(torch.from_numpy(u)).numpy()  # u = 0: -inf, t = 0
        t = 1.0 / (1.0 + np.exp(-n))
    else:
        t = u
    return shift * t / (1.0 + (shift - 1.0) * t)


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class FlowMatching:
    """Rectified flow: timesteps from `density` (+ `shift`), x_t = (1 - t) x0 + t eps, target
    v = eps - x0, an MSE loss with SD3's `weighting`; the flow DPM-Solver++ samples it."""

    kind = "flow"
    terms = ("loss", "mse")  # the weighted loss, and the plain MSE on v
    learned_sigma = False  # v only; a model with 2x output channels (an imported DiT) is read on its first half
    # this objective's own settings (TrainConfig fields) and their defaults
    OWN = {"timestep_density": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "flow_shift": 1.0}
    WEIGHTINGS = WEIGHTINGS

    def __init__(self, density: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
                 weighting: str = "none", num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
        self.density, self.logit_mean, self.logit_std, self.shift = density, logit_mean, logit_std, shift
        self.weighting, self.num_timesteps = weighting, num_timesteps

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "FlowMatching":
        """The objective a stage's settings (or a checkpoint's recorded config) describe."""
        return cls(settings.get("timestep_density", "uniform"), settings.get("logit_mean", 0.0), settings.get("logit_std", 1.0),
                   settings.get("flow_shift", 1.0), settings.get("loss_weighting", "none"))

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """A UserError for flow settings it cannot train with (before any work)."""
        density = settings.get("timestep_density", "uniform")
        if density not in DENSITIES:
            raise UserError(f"timestep_density {density!r} is not one of {', '.join(DENSITIES)}: pick one")
        if not settings.get("logit_std", 1.0) > 0:
            raise UserError(f"logit_std must be > 0 (SD3: 1.0), got {settings.get('logit_std')}")
        if not settings.get("flow_shift", 1.0) > 0:
            raise UserError(f"flow_shift must be > 0 (1: no shift; Sana: 3.0), got {settings.get('flow_shift')}")

    @property
    def predicts(self) -> str:
        """What the model's output is."""
        return "flow velocity (eps - x0)"

    def settings(self) -> dict[str, Any]:
        """The settings that fix what the model predicts."""
        return {"objective": self.kind}

    def draw_timesteps(self, words: np.ndarray) -> torch.Tensor:
        """Model timesteps 1000 t (float32), one per sample's random word."""
        t = flow_times(uniforms(words), self.density, self.logit_mean, self.logit_std, self.shift)
        return torch.from_numpy(t * self.num_timesteps).float()

    def _sigma(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return (t.float() / self.num_timesteps).view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps."""
        s = self._sigma(t, x0.ndim).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = eps - x0 (the velocity d x_t / dt)."""
        return noise - x0

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights of `loss_weighting` (SD3's schemes) at model timesteps t."""
        s = t.float() / self.num_timesteps
        if self.weighting == "sigma_sqrt":
            return s.clamp(min=SIGMA_SQRT_FLOOR) ** -2.0
        if self.weighting == "cosmap":
            return 2.0 / (math.pi * (1 - 2 * s + 2 * s**2))
        return torch.ones_like(s)

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses {"loss": weighted MSE, "mse": plain MSE on v}."""
        out = model_output.float()
        if out.shape[1] == 2 * x0.shape[1]:  # an output that also carries a variance (an imported DiT): unused
            out = out[:, : x0.shape[1]]
        mse = _mean_flat((out - self.target(x0.float(), noise.float(), t)) ** 2)
        return {"loss": self.weights(t).to(mse.device) * mse, "mse": mse}

    def sampler(self):
        """DPM-Solver++ (2nd order) on the flow's sigmas, shifted as in training."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(
            num_train_timesteps=self.num_timesteps, algorithm_type="dpmsolver++", solver_order=2,
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=self.shift, lower_order_final=True,
        )
