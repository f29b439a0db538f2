"""The DDPM objective (a t2i.objective.Objective): 1000-step DDPM with linear betas and learned
sigma, diffusers' DDPMScheduler for the noise schedule, plus the one piece diffusers lacks, the
IDDPM hybrid loss (MSE on the prediction + VLB). It draws the training timesteps
(`draw_timesteps`, `timestep_power`) and names the sampler that matches it (DPM-Solver++).
`loss_weighting = "min_snr"` weights the MSE term by min-SNR-gamma (Hang et al. 2023; diffusers'
compute_snr): min(SNR_t, gamma) / SNR_t for epsilon, min(SNR_t, gamma) / (SNR_t + 1) for v.

The model predicts epsilon (the paper's choice, and ImageNet DiT's) or v = sqrt(acp) eps -
sqrt(1 - acp) x0 (`prediction_type="v_prediction"`, Salimans & Ho 2022). On small latents v is
the better target: an epsilon error is multiplied by sqrt((1 - acp) / acp) in the implied x0,
which at high noise turns small errors into wrong colours and stray blobs.

The VLB term follows improved-diffusion / DiT `gaussian_diffusion.py`: the KL between the true
posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian, whose variance interpolates (learned
range) between the posterior variance and beta_t; at t = 0 the discretised Gaussian decoder NLL.
The mean is computed from a detached epsilon, so the VLB only trains the variance.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from shards.errors import UserError
from t2i.noise import below, uniforms
from t2i.solver import dpm_solver


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


def _mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


PREDICTION_TYPES = ("epsilon", "v_prediction")  # diffusers' names, as schedulers take them
WEIGHTINGS = ("none", "min_snr")


def draw_timesteps(words: np.ndarray, num_timesteps: int, power: float = 1.0) -> torch.Tensor:
    """One timestep per word: uniform in [0, T) for `power` 1, else floor(T * u**power), which
    for power < 1 puts more of the draws on the noisy end (power 0.6: 69% of them in t >= T/2)."""
    if power == 1.0:
        return torch.from_numpy(below(words, num_timesteps))
    t = np.floor(num_timesteps * uniforms(words) ** power).astype(np.int64)
    return torch.from_numpy(np.minimum(t, num_timesteps - 1))


class Diffusion:
    """The DDPM objective: noise schedule, timestep draws, training target and loss, and the
    sampler for it. `learned_sigma`: the model outputs [prediction, variance interpolation] (2x
    channels); `prediction_type`: what the first half predicts; `timestep_power`: see
    `draw_timesteps`."""

    kind = "ddpm"
    terms = ("loss", "mse", "vb")  # the per-sample losses `loss` returns, the total first
    # this objective's own settings (TrainConfig fields) and their defaults (learned_sigma, default
    # True, is left out: a flow stage ignores it)
    OWN = {"prediction_type": "epsilon", "timestep_power": 1.0, "snr_gamma": 5.0}
    WEIGHTINGS = WEIGHTINGS

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, learned_sigma: bool = True,
                 prediction_type: str = "epsilon", timestep_power: float = 1.0, loss_weighting: str = "none",
                 snr_gamma: float = 5.0):
        from diffusers import DDPMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")

        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_timesteps,
            beta_schedule="linear",
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type=prediction_type,
            variance_type="learned_range" if learned_sigma else "fixed_small",
            clip_sample=False,
        )
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.learned_sigma = learned_sigma
        self.prediction_type = prediction_type
        self.timestep_power = timestep_power
        self.loss_weighting, self.snr_gamma = loss_weighting, snr_gamma
        # float64 tables, as in improved-diffusion, computed from the scheduler's betas
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self._tables = {
            "sqrt_recip_acp": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_acp": np.sqrt(1.0 / alphas_cumprod - 1),
            "sqrt_acp": np.sqrt(alphas_cumprod),
            "sqrt_1m_acp": np.sqrt(1.0 - alphas_cumprod),
            "post_logvar_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "post_c1": betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            "post_c2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }
        self._cache: dict = {}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Diffusion":
        """The objective a stage's settings (a TrainConfig's fields, or the config a checkpoint
        recorded) describe; settings from before an option existed take its default."""
        return cls(learned_sigma=settings.get("learned_sigma", True), prediction_type=settings.get("prediction_type", "epsilon"),
                   timestep_power=settings.get("timestep_power", 1.0), loss_weighting=settings.get("loss_weighting", "none"),
                   snr_gamma=settings.get("snr_gamma", 5.0))

    @staticmethod
    def check_settings(settings: Mapping[str, Any]) -> None:
        """A UserError for settings this objective cannot train with (before any work)."""
        kind = settings.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise UserError(f"prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}: pick one")
        power = settings.get("timestep_power", 1.0)
        if power <= 0:
            raise UserError(f"timestep_power must be > 0 (1: uniform timesteps), got {power}")
        if not settings.get("snr_gamma", 5.0) > 0:
            raise UserError(f"snr_gamma must be > 0 (min-SNR's gamma; 5 is common), got {settings.get('snr_gamma')}")

    @property
    def predicts(self) -> str:
        """What the model's output (its first half, with learned sigma) is."""
        return self.prediction_type

    def settings(self) -> dict[str, Any]:
        """The settings that fix what the model predicts (named in warnings about a change)."""
        return {"prediction_type": self.prediction_type}

    def draw_timesteps(self, words: np.ndarray) -> torch.Tensor:
        """The training timesteps of a micro-batch, one per sample's random word."""
        return draw_timesteps(words, self.num_timesteps, self.timestep_power)

    def sampler(self):
        """The sampling scheduler for a model trained with this objective: DPM-Solver++ on the
        training schedule (sample, export, eval and the class-cond sampler draw with it)."""
        return dpm_solver(self.prediction_type, self.num_timesteps, self.beta_start, self.beta_end)

    def _t(self, name, t, ndim):
        key = (name, t.device)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._tables[name]).float().to(t.device)
        return self._cache[key][t].view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise (diffusers' DDPMScheduler)."""
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output (its first half, with learned sigma) for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        return self._t("sqrt_acp", t, x0.ndim) * noise - self._t("sqrt_1m_acp", t, x0.ndim) * x0

    def predicted_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent implied by the model's prediction at x_t."""
        nd = x_t.ndim
        if self.prediction_type == "epsilon":
            return self._t("sqrt_recip_acp", t, nd) * x_t - self._t("sqrt_recipm1_acp", t, nd) * pred
        return self._t("sqrt_acp", t, nd) * x_t - self._t("sqrt_1m_acp", t, nd) * pred

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the MSE term: min-SNR-gamma, or ones."""
        if self.loss_weighting != "min_snr":
            return torch.ones(t.shape, device=t.device)
        snr = self._t("snr", t, 1)
        return snr.clamp(max=self.snr_gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses {"loss": weighted MSE + VB, "mse" (unweighted), "vb"} (vb = 0 without learned sigma)."""
        model_output = model_output.float()
        x0, x_t, noise = x0.float(), x_t.float(), noise.float()
        target = self.target(x0, noise, t)
        if not self.learned_sigma:
            mse = _mean_flat((target - model_output) ** 2)
            return {"loss": self.weights(t) * mse, "mse": mse, "vb": torch.zeros_like(mse)}
        pred, v = model_output.chunk(2, dim=1)
        mse = _mean_flat((target - pred) ** 2)
        nd = x0.ndim
        # model variance: interpolate log-variance between posterior (min) and beta (max)
        min_log = self._t("post_logvar_clipped", t, nd)
        max_log = self._t("log_betas", t, nd)
        frac = (v + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        # model mean from the detached prediction (VLB trains only the variance)
        pred_x0 = self.predicted_x0(pred.detach(), x_t, t)
        c1, c2 = self._t("post_c1", t, nd), self._t("post_c2", t, nd)
        model_mean = c1 * pred_x0 + c2 * x_t
        true_mean = c1 * x0 + c2 * x_t
        kl = _mean_flat(_normal_kl(true_mean, min_log, model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)
        return {"loss": self.weights(t) * mse + vb, "mse": mse, "vb": vb}
