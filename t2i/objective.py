"""What a stage trains its model to do: the `Objective` (timesteps, noising, target, loss, and the
sampler that matches them) and the auxiliary `LossTerm`s added to its loss.

Kinds of objective (OBJECTIVES, chosen by a stage's `objective` setting; "ddpm" when it has none):
- "ddpm": t2i.diffusion.Diffusion, epsilon or v-prediction with the IDDPM hybrid loss (min-SNR-gamma
  weighting optional);
- "flow": t2i.flow.FlowMatching, rectified flow (v = eps - x0) with SD3's timestep densities,
  resolution shift and loss weightings, sampled by the flow DPM-Solver++.

Each kind lists its own settings (`OWN`, TrainConfig fields with their defaults); a stage that
sets another kind's setting is refused (it would do nothing), as is one that changes any of
OBJECTIVE_FIELDS on --resume (`check_resume_objective`), or that starts from a model trained with
the other kind (`check_init_objective`: no weight conversion maps a DDPM model onto a flow one).

A kind is a class with `from_settings(settings)` and `check_settings(settings)`, where settings
are a TrainConfig's fields or the config a checkpoint recorded in its trainer_state.json: so
sample, export, eval and the class-cond sampler rebuild the objective a checkpoint was trained
with (`objective_of_state`) from what training already records, nothing more.

Where levers plug in, each at one place and without an `if` in the loop:
- a kind: a class with the methods of `Objective`, registered in OBJECTIVES; its settings are
  fields of TrainConfig, recorded in every checkpoint's config. The sampler runs inside
  diffusers' PixArtAlphaPipeline, which calls `scale_model_input` and `init_noise_sigma`
  (FlowMatchEulerDiscreteScheduler has neither: flow uses the flow DPM-Solver++, which has both);
- loss weighting: inside a kind's `loss`, from its settings;
- an auxiliary loss (REPA, t2i.repa): a `LossTerm` handed to t2i.train.TrainStep (`terms`); it
  adds its own modules and hooks to the trained model in `attach`, takes what it needs from each
  batch in `inputs` (the stored teacher features) and adds its value to the total and the log.
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
from t2i.flow import FlowMatching

OBJECTIVES: dict[str, Any] = {Diffusion.kind: Diffusion, FlowMatching.kind: FlowMatching}  # kind -> class
DEFAULT_OBJECTIVE = Diffusion.kind
# every setting that fixes what a stage trains its model to do, and its default (a checkpoint
# from before a setting existed trained with the default)
OBJECTIVE_FIELDS: dict[str, Any] = {"objective": DEFAULT_OBJECTIVE, "learned_sigma": True, "loss_weighting": "none",
                                    **{k: v for cls in OBJECTIVES.values() for k, v in cls.OWN.items()}}


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
    macs: int  # multiply-adds per token of the modules it trains with the model (counted in the FLOPs; set by attach)

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
    """A UserError for an unknown objective, settings it cannot train with, or a setting of
    another kind (which would do nothing), before any work."""
    cls = objective_class(settings)
    weighting = settings.get("loss_weighting", "none")
    if weighting not in cls.WEIGHTINGS:
        raise UserError(f"loss_weighting {weighting!r} is not one for objective {cls.kind!r} ({', '.join(cls.WEIGHTINGS)}): pick one")
    cls.check_settings(settings)
    for other in OBJECTIVES.values():
        for key, default in other.OWN.items():
            if other is not cls and key not in cls.OWN and settings.get(key, default) != default:
                raise UserError(f"{key} = {settings[key]!r} is a setting of objective {other.kind!r}, this stage trains "
                                f"objective = {cls.kind!r}: remove it, or set objective = {other.kind!r}")


def build_objective(settings: Mapping[str, Any]) -> Objective:
    """The objective a stage's settings (a TrainConfig's fields, or a checkpoint's config) describe."""
    return objective_class(settings).from_settings(settings)


def objective_of_state(trainer_state: Mapping[str, Any]) -> Objective:
    """The objective a checkpoint was trained with, from its trainer_state.json."""
    return build_objective(trainer_state.get("config", {}))


def _objective_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: settings.get(k, default) for k, default in OBJECTIVE_FIELDS.items()}


def check_resume_objective(ck: Path, saved: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse to resume checkpoint `ck` (its recorded config `saved`) with other objective
    settings: the run would change what it trains from the middle on."""
    theirs, ours = _objective_settings(saved), _objective_settings(settings)
    differ = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in OBJECTIVE_FIELDS if theirs[k] != ours[k]]
    if differ:
        raise UserError(f"checkpoint {ck} was trained with other objective settings: {'; '.join(differ)}: resume with the "
                        "checkpoint's settings, or start a new --out with init = \"checkpoint:...\"")


def recorded_objective(source: Path) -> dict[str, Any] | None:
    """The objective settings a model directory records: one of our checkpoints (its trainer
    state), a pipeline folder whose scheduler samples flow (an export of a flow model); None for
    anything else (an ImageNet DiT, a released PixArt: DDPM models)."""
    state = source / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("config", {})
    sched = source / "scheduler" / "scheduler_config.json"
    if sched.is_file() and json.loads(sched.read_text()).get("prediction_type") == "flow_prediction":
        return {"objective": FlowMatching.kind}
    return None


def check_init_objective(settings: Mapping[str, Any], source: Path) -> None:
    """Refuse an init model trained with another kind of objective (DDPM <-> flow): they read
    inputs on other noise scales at other timesteps and predict other quantities, and no weight
    conversion maps one onto the other. Warn when it only predicts something else (epsilon <-> v)."""
    recorded = recorded_objective(source)
    theirs = build_objective(recorded if recorded is not None else {})
    ours = build_objective(settings)
    if theirs.kind != ours.kind:
        raise UserError(f"init {source} was trained with objective {theirs.kind!r}, this stage trains {ours.kind!r}: a DDPM "
                        "model reads sqrt(acp) x0 + sqrt(1 - acp) eps at integer steps and predicts eps or v, a flow model "
                        "reads (1 - t) x0 + t eps and predicts eps - x0, and no weight conversion maps one onto the other: "
                        f"train the earlier stage with objective = {ours.kind!r} too (a class-cond stage can), or set "
                        f"objective = {theirs.kind!r}")
    if recorded is not None:
        warn_on_objective_change(theirs, ours, source)


def warn_on_objective_change(theirs: Objective, ours: Objective, source: Path) -> None:
    """Warn when the init checkpoint was trained to predict something else than this stage:
    allowed (a fine-tune can switch), but it starts off wrong."""
    if theirs.predicts != ours.predicts:
        fix = ", ".join(f"{k} = {v!r}" for k, v in theirs.settings().items())
        warnings.warn(f"init {source} predicts {theirs.predicts}, this stage trains {ours.predicts}: its first steps re-learn "
                      f"the output; set {fix} to continue as it was trained", stacklevel=4)
