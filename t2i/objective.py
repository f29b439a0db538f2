"""What a stage trains its model to do: the `Objective` (timesteps, noising, target, loss, and the
sampler that matches them) and the auxiliary `LossTerm`s added to its loss.

Kinds of objective (OBJECTIVES, chosen by a stage's `objective` setting; "ddpm" when it has none):
- "ddpm": t2i.diffusion.Diffusion, epsilon or v-prediction with the IDDPM hybrid loss.

A kind is a class with `from_settings(settings)` and `check_settings(settings)`, where settings
are a TrainConfig's fields or the config a checkpoint recorded in its trainer_state.json: so
sample, export, eval and the class-cond sampler rebuild the objective a checkpoint was trained
with (`objective_of_state`) from what training already records, nothing more.

Where the next levers plug in, each at one place and without an `if` in the loop:
- a new kind (flow matching): a class with the methods of `Objective` (its timestep density in
  `draw_timesteps`, x_t = (1 - t) x0 + t eps in `add_noise`, v = eps - x0 in `target`, its loss
  and log columns in `loss` / `terms`, its `sampler`), registered in OBJECTIVES; its settings
  are fields of TrainConfig, recorded in every checkpoint's config. The sampler runs inside
  diffusers' PixArtAlphaPipeline, which calls `scale_model_input` and `init_noise_sigma`:
  DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=...) has them, FlowMatchEulerDiscreteScheduler does not (it needs a subclass that
  adds them);
- loss weighting (min-SNR-gamma): inside a kind's `loss`, from its settings;
- an auxiliary loss (REPA): a `LossTerm` handed to t2i.train.TrainStep (`terms`); it adds its
  own modules and hooks to the trained model in `attach`, takes what it needs from each batch
  in `inputs` (the stored teacher features) and adds its value to the total and the log.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from shards.errors import UserError
from t2i.diffusion import Diffusion

OBJECTIVES: dict[str, Any] = {Diffusion.kind: Diffusion}  # kind -> class (from_settings, check_settings)
DEFAULT_OBJECTIVE = Diffusion.kind


class Objective(Protocol):
    """The training objective of a stage, and the sampler that matches it."""

    kind: str
    terms: tuple[str, ...]  # the per-sample losses `loss` returns (the log's columns), the total ("loss") first
    learned_sigma: bool  # the model also outputs a variance (2x channels)

    @property
    def predicts(self) -> str:
        """What the model's output is (epsilon, v_prediction, ...): named in warnings."""

    def settings(self) -> dict[str, Any]:
        """The settings that fix what the model predicts (a warning tells to set them back)."""

    def draw_timesteps(self, words: np.ndarray) -> torch.Tensor:
        """One training timestep per sample, from that sample's random 64-bit word (t2i.noise)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, the model's input."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = add_noise(x0, noise, t)."""

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample losses, one per name of `terms`."""

    def sampler(self):
        """A diffusers scheduler that samples from a model trained with this objective."""


class LossTerm(Protocol):
    """An auxiliary per-sample loss, added to the objective's total with `weight` and logged as `name`."""

    name: str
    weight: float

    def attach(self, model: torch.nn.Module) -> None:
        """Add the term's trained modules and forward hooks to the model (before the optimizer is built)."""

    def inputs(self, batch) -> dict[str, torch.Tensor]:
        """What the term needs from a batch (CPU tensors, e.g. stored teacher features); the
        micro-batch inputs carry them under the term's name."""

    def __call__(self, inp: dict[str, Any]) -> torch.Tensor:
        """The per-sample loss of the micro-batch whose forward pass just ran."""


def add_terms(losses: dict[str, torch.Tensor], terms: Sequence[LossTerm], inp: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The objective's losses with each auxiliary term's value added under its name and, times its
    weight, to the total ("loss"); no terms: `losses` unchanged."""
    for term in terms:
        value = term(inp)
        losses = {**losses, term.name: value, "loss": losses["loss"] + term.weight * value}
    return losses


def objective_class(settings: Mapping[str, Any]):
    """The objective kind of a stage's settings."""
    kind = settings.get("objective", DEFAULT_OBJECTIVE)
    if kind not in OBJECTIVES:
        raise UserError(f"objective {kind!r} is not one of {', '.join(OBJECTIVES)}: pick one")
    return OBJECTIVES[kind]


def check_objective(settings: Mapping[str, Any]) -> None:
    """A UserError for an unknown objective or settings it cannot train with (before any work)."""
    objective_class(settings).check_settings(settings)


def build_objective(settings: Mapping[str, Any]) -> Objective:
    """The objective a stage's settings (a TrainConfig's fields, or a checkpoint's config) describe."""
    return objective_class(settings).from_settings(settings)


def objective_of_state(trainer_state: Mapping[str, Any]) -> Objective:
    """The objective a checkpoint was trained with, from its trainer_state.json."""
    return build_objective(trainer_state.get("config", {}))


def warn_on_objective_change(settings: Mapping[str, Any], source: Path) -> None:
    """Warn when the init checkpoint (one of ours: it has a trainer state) was trained to predict
    something else than this stage: allowed (a fine-tune can switch), but it starts off wrong."""
    state = source / "trainer_state.json"
    if not state.is_file():
        return  # not ours (an ImageNet DiT, a diffusers model): nothing recorded to compare
    theirs, ours = objective_of_state(json.loads(state.read_text())), build_objective(settings)
    if theirs.predicts != ours.predicts:
        fix = ", ".join(f"{k} = {v!r}" for k, v in theirs.settings().items())
        warnings.warn(f"init {source} predicts {theirs.predicts}, this stage trains {ours.predicts}: its first steps re-learn "
                      f"the output; set {fix} to continue as it was trained", stacklevel=3)
