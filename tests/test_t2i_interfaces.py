"""The trainer's two seams: the Objective (t2i.objective; DDPM, t2i.diffusion, or flow, t2i.flow) rebuilt
from a stage's settings or a checkpoint's config, with auxiliary loss terms added to its loss; and
the Conditioning of each stage kind (t2i.conditioning, t2i.kinds)."""

import numpy as np
import pytest
import torch

from shards.errors import UserError
from t2i.diffusion import Diffusion, draw_timesteps
from t2i.objective import add_terms, build_objective, check_objective, objective_of_state

torch.set_num_threads(1)


def test_objective_comes_back_from_what_a_checkpoint_records():
    saved = {"config": {"prediction_type": "v_prediction", "timestep_power": 0.6, "learned_sigma": False}}
    objective = objective_of_state(saved)
    assert isinstance(objective, Diffusion) and objective.predicts == "v_prediction" and not objective.learned_sigma
    assert objective.sampler().config.prediction_type == "v_prediction"
    words = np.arange(1, 50, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert torch.equal(objective.draw_timesteps(words), draw_timesteps(words, 1000, 0.6))
    old = objective_of_state({})  # a checkpoint from before the options: epsilon, learned sigma, uniform steps
    assert old.predicts == "epsilon" and old.learned_sigma and old.timestep_power == 1.0 and old.terms == ("loss", "mse", "vb")
    with pytest.raises(UserError, match="objective 'edm' is not one of ddpm, flow"):
        build_objective({"objective": "edm"})
    with pytest.raises(UserError, match="timestep_power must be > 0"):
        check_objective({"timestep_power": -1})


class Tenth:
    """A stand-in auxiliary loss (as REPA would read them): a tenth of the mean square of the first
    block's tokens, seen through a forward hook."""""

    name, weight = "aux", 0.5

    def attach(self, model):
        model.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: setattr(self, "seen", out))

    def inputs(self, batch):
        return {}

    def __call__(self, inp):
        return self.seen.float().square().mean(dim=(1, 2)) / 10


def test_loss_terms_add_to_the_total_and_to_the_log_without_touching_the_objective():
    from accelerate import Accelerator

    from t2i.models import PixArtWithNull, Preset, build_transformer
    from t2i.train import TrainStep

    objective, term = Diffusion(), Tenth()
    base = {"loss": torch.ones(3), "mse": torch.ones(3)}
    assert add_terms(base, (), {}) is base  # no terms: the objective's losses as they are
    torch.manual_seed(0)
    model = PixArtWithNull(build_transformer(Preset(depth=1, hidden=32, heads=2, patch=2), 8, 16), 4)
    term.attach(model)
    accel = Accelerator(cpu=not torch.cuda.is_available())  # as the trainer makes it (t2i.train.make_accelerator)
    model.to(accel.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(accel, model, model, opt, None, None, objective, terms=[term])
    assert step.log_terms == ("loss", "mse", "vb", "aux")
    g = torch.Generator().manual_seed(1)
    inp = {"x0": torch.randn(3, 4, 8, 8, generator=g), "noise": torch.randn(3, 4, 8, 8, generator=g),
           "t": torch.tensor([10, 500, 990]), "drop": torch.tensor([False, True, False]),
           "cond": {"captions": torch.randn(3, 4, 16, generator=g), "caption_mask": torch.ones(3, 4, dtype=torch.long)}}
    loss, mse, vb, aux = step.micro(inp, size=(64, 64)).tolist()
    assert aux > 0 and loss == pytest.approx(mse + vb + 0.5 * aux, rel=1e-6)


def test_each_kind_answers_for_its_stages():
    from t2i.class_cond import ClassConditioning
    from t2i.kinds import conditioning_class
    from t2i.text_cond import TextConditioning

    assert conditioning_class(None) is conditioning_class("text-to-image") is TextConditioning
    assert conditioning_class("class-cond") is ClassConditioning
    with pytest.raises(UserError, match="kind 'unet' is not one of text-to-image, class-cond"):
        conditioning_class("unet")
    assert TextConditioning.cross_attention and not ClassConditioning.cross_attention  # what the FLOPs count
    # init = "previous": a text-to-image stage imports a class-cond DiT; anything else continues a checkpoint
    assert TextConditioning.init_from_previous(ClassConditioning) == "dit"
    assert TextConditioning.init_from_previous(TextConditioning) == "checkpoint"
    assert ClassConditioning.init_from_previous(ClassConditioning) == ClassConditioning.init_from_previous(TextConditioning) == "checkpoint"
    assert TextConditioning().checkpoint_extras({}, {}) is None
