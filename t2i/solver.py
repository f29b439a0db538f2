"""The sampler's solver: DPM-Solver++ on the training noise schedule (the DDPM objective,
t2i.diffusion.Diffusion.sampler, hands it to sample, export, eval and the class-cond sampler)."""

from __future__ import annotations


def dpm_solver(prediction_type: str = "epsilon", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02):
    """DPM-Solver++ (2nd order) on the training schedule (default: 1000 steps, linear betas from
    1e-4 to 0.02), for a model that predicts `prediction_type` (epsilon | v_prediction, its
    training config's)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=beta_start, beta_end=beta_end,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction_type, lower_order_final=True,
    )
