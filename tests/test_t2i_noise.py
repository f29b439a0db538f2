"""The trainer's per-sample noise (t2i.noise through t2i.train.make_inputs): drawn for a whole
micro-batch at once, yet each sample's draws depend on its own key alone (not on its batch
neighbours, the batch size or the number of processes), and they are standard normals, uniform
timesteps and caption drops at the configured rate."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i.diffusion import Diffusion, draw_timesteps
from t2i.noise import below, normal_pairs, random_words, sample_keys
from t2i.train import make_inputs

SHAPE = (4, 8, 8)


def batch_of(samples: np.ndarray) -> SimpleNamespace:
    """A micro-batch of the given global-batch positions, each with its own stored posterior."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, *SHAPE, generator=gen)[torch.from_numpy(samples)]
    return SimpleNamespace(latent_mean=mean, latent_std=torch.full_like(mean, 0.5), text=None, mask=None)


def inputs(positions: np.ndarray, seed: int = 3, epoch: int = 1, batch_pos: int = 2) -> dict[str, torch.Tensor]:
    return make_inputs(batch_of(positions), 0.18, Diffusion(), 0.3, sample_keys(seed, epoch, batch_pos, positions))


def test_a_samples_noise_does_not_depend_on_its_neighbours_or_the_batch_size():
    whole = inputs(np.arange(16))
    for world in (2, 4, 16):  # the same global batch split over 2, 4 or 16 ranks
        share = 16 // world
        parts = [inputs(rank * share + np.arange(share)) for rank in range(world)]
        for name in ("x0", "noise", "t", "drop"):
            assert torch.equal(torch.cat([p[name] for p in parts]), whole[name]), (world, name)
    picked = np.array([13, 2, 7])  # other neighbours, another order, another batch size
    few = inputs(picked)
    for name in ("x0", "noise", "t", "drop"):
        assert torch.equal(few[name], whole[name][torch.from_numpy(picked)]), name
    # big latents are drawn a block of words at a time, the blocks set by the batch size: the same values
    keys = sample_keys(3, 1, 2, np.arange(64))
    many, one = normal_pairs(keys, 3000, first=2), normal_pairs(keys[5:6], 3000, first=2)
    for m, o in zip(many, one):
        assert m.shape == (64, 3000) and m.dtype == np.float32 and np.array_equal(m[5:6], o)


def test_every_sample_place_has_its_own_noise():
    keys = [sample_keys(s, e, b, np.arange(8)) for s in (0, 1) for e in (0, 1) for b in (0, 1, 2)]
    flat = np.concatenate(keys)
    assert len(set(flat.tolist())) == len(flat) == 2 * 2 * 3 * 8
    assert np.array_equal(sample_keys(-1, 0, 0, [0]), sample_keys(2**64 - 1, 0, 0, [0]))  # seeds modulo 2^64
    a, b = inputs(np.arange(16), seed=3), inputs(np.arange(16), seed=4)
    assert not torch.equal(a["noise"], b["noise"]) and not torch.equal(a["x0"], b["x0"])
    assert not torch.equal(a["noise"][0], a["noise"][1])  # neighbours differ


def test_draws_have_the_right_distributions():
    big = make_inputs(batch_of(np.zeros(4096, np.int64)), 1.0, Diffusion(), 0.3, sample_keys(0, 0, 0, np.arange(4096)))
    noise = big["noise"].double()
    eps = (big["x0"] - batch_of(np.zeros(4096, np.int64)).latent_mean) / 0.5  # the posterior draw
    for z in (noise, eps.double()):
        assert abs(z.mean()) < 0.005 and abs(z.std() - 1) < 0.005
        assert abs((z**4).mean() - 3) < 0.05  # normal tails, not uniform (1.8) or heavy
    assert abs(torch.corrcoef(torch.stack([noise.ravel(), eps.double().ravel()]))[0, 1]) < 0.005
    assert big["t"].min() >= 0 and big["t"].max() < 1000 and big["t"].dtype == torch.int64
    counts = np.bincount(below(random_words(np.arange(100), 1000), 1000).ravel(), minlength=1000)
    assert len(counts) == 1000 and counts.min() > 50 and counts.max() < 150  # 100 expected in each of the 1000
    assert abs(big["drop"].double().mean() - 0.3) < 0.03


def test_timestep_power_below_one_trains_the_noisy_end_more_often():
    words = random_words(sample_keys(5, 0, 0, np.arange(20000)), 1)[:, 0]
    uniform = draw_timesteps(words, 1000, 1.0)
    assert torch.equal(uniform, torch.from_numpy(below(words, 1000)))  # power 1: the draws runs always had
    noisy = draw_timesteps(words, 1000, 0.6)
    assert noisy.dtype == torch.int64 and int(noisy.min()) >= 0 and int(noisy.max()) == 999
    # P(t >= T/2) = 1 - 0.5 ** (1 / 0.6) = 0.685, against 0.5 when uniform
    assert abs(float((noisy >= 500).float().mean()) - 0.685) < 0.02
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.02
    assert torch.equal(noisy, draw_timesteps(words, 1000, 0.6))  # the same words give the same steps
    # make_inputs passes the setting through; the other draws do not change
    keys = sample_keys(3, 1, 2, np.arange(8))
    a = make_inputs(batch_of(np.arange(8)), 0.18, Diffusion(), 0.3, keys)
    b = make_inputs(batch_of(np.arange(8)), 0.18, Diffusion(timestep_power=0.6), 0.3, keys)
    assert torch.all(b["t"] >= a["t"]) and torch.any(b["t"] > a["t"])  # u**0.6 >= u for every u in [0, 1)
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["drop"], b["drop"])


def test_timestep_power_must_be_positive():
    from shards.errors import UserError
    from t2i.train import TrainConfig

    with pytest.raises(UserError, match="timestep_power must be > 0"):
        TrainConfig(preset="PixArt-tiny/2", timestep_power=0).validate()
