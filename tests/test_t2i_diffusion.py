"""The training targets and the loss of t2i.diffusion, for both prediction types."""

import pytest
import torch

from t2i.diffusion import Diffusion


def _noised(d: Diffusion, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    return x0, noise, t, d.add_noise(x0, noise, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_true_target_recovers_x0_and_matches_diffusers(prediction_type):
    d = Diffusion(learned_sigma=False, prediction_type=prediction_type)
    x0, noise, t, x_t = _noised(d)
    target = d.target(x0, noise, t)
    assert torch.allclose(d.predicted_x0(target, x_t, t), x0, atol=2e-3)
    if prediction_type == "v_prediction":  # diffusers' own definition of v, used by its samplers
        assert torch.allclose(target, d.scheduler.get_velocity(x0, noise, t), atol=1e-5)
    else:
        assert torch.equal(target, noise)
    assert d.loss(target, x0, x_t, noise, t)["loss"].abs().max() < 1e-10


def test_v_target_is_not_epsilon_and_the_loss_sees_the_difference():
    eps, v = Diffusion(learned_sigma=False), Diffusion(learned_sigma=False, prediction_type="v_prediction")
    x0, noise, t, x_t = _noised(eps)
    # an epsilon-perfect output is wrong for a v model, most at high noise
    per_sample = v.loss(noise, x0, x_t, noise, t)["mse"]
    assert per_sample[-1] > 0.5 and per_sample[0] < 1e-3


def test_learned_sigma_vb_uses_the_prediction_type():
    d = Diffusion(learned_sigma=True, prediction_type="v_prediction")
    x0, noise, t, x_t = _noised(d)
    perfect = torch.cat([d.target(x0, noise, t), torch.zeros_like(x0)], dim=1)
    wrong = torch.cat([noise, torch.zeros_like(x0)], dim=1)  # epsilon read as v
    good, bad = d.loss(perfect, x0, x_t, noise, t), d.loss(wrong, x0, x_t, noise, t)
    assert good["mse"].max() < 1e-10
    assert good["vb"][1:].mean() < bad["vb"][1:].mean()


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        Diffusion(prediction_type="sample")
