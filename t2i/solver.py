"""The sampler's solver: DPM-Solver++ on the training noise schedule (sample, export, eval and the
class-cond sampler all draw with it)."""

from __future__ import annotations


def dpm_solver(prediction_type: str = "epsilon"):
    """DPM-Solver++ (2nd order) on the training schedule: 1000 steps, linear betas, for a model
    that predicts `prediction_type` (epsilon | v_prediction, its training config's)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2, prediction_type=prediction_type, lower_order_final=True,
    )
