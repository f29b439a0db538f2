"""ema_every (issue 33): the EMA averaged on every k-th optimizer step only, with the decay of the
k steps it stands for (t2i.train.ema.StridedEMA); which steps move it depends on the global step
alone, so a resumed run ends with the very EMA of one that never stopped."""

from pathlib import Path

import pytest
import torch

from shards.errors import UserError
from test_t2i_recovery import tiny_cfg as recovery_cfg
from test_t2i_recovery import world  # noqa: F401 - the fixture

torch.set_num_threads(1)


def diffusers_decay(n: int, decay: float) -> float:
    """diffusers' per-step decay at optimization step n (no warm-up option): (n - 1 + 1) / (n - 1 + 10),
    at most `decay`; 0 at the first step (the EMA starts as a copy)."""
    return 0.0 if n <= 1 else min(decay, n / (9 + n))


def trajectory(steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Weights an optimizer could have taken: one random tensor per step."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(steps)]


def follow(ema, param: torch.nn.Parameter, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Step `ema` once per weight (set into `param` first); the shadow after each step."""
    seen = []
    for w in weights:
        with torch.no_grad():
            param.copy_(w)
        ema.step([param])
        seen.append(ema.shadow_params[0].clone())
    return seen


def test_every_step_is_diffusers_ema_bit_for_bit():
    from diffusers.training_utils import EMAModel

    from t2i.train.ema import StridedEMA

    p, q = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    ws = trajectory(7)
    ours = follow(StridedEMA([p], every=1, decay=0.9, foreach=True), p, ws)
    theirs = follow(EMAModel([q], decay=0.9, foreach=True), q, ws)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("start", [0, 19_998])  # the warm-up ramp, then the plain decay (decay ** k)
def test_every_k_steps_moves_once_with_the_decay_of_k_steps(start):
    from t2i.train.ema import StridedEMA

    k, decay, steps = 3, 0.999, 10
    init = torch.randn(5, 3, dtype=torch.float64)
    p = torch.nn.Parameter(init.clone())
    ema = StridedEMA([p], every=k, decay=decay, foreach=True)
    ema.optimization_step = start  # as a resume restores it
    ws = trajectory(steps, seed=1)
    seen = follow(ema, p, ws)
    ref, last = init.clone(), start
    for i, w in enumerate(ws):
        n = start + i + 1
        if n % k == 0:
            d = 1.0
            for s in range(n - k + 1, n + 1):
                d *= diffusers_decay(s, decay)
            ref = d * ref + (1 - d) * w
            last = n
        assert torch.allclose(seen[i], ref, rtol=1e-12, atol=1e-12), n
    assert ema.optimization_step == start + steps  # counts optimizer steps, as checkpoints save it
    assert last == start + 9  # moved on steps 3, 6, 9 only: step 10 left it where step 9 put it
    assert torch.equal(seen[-1], seen[-2])
    if start:
        assert ema.cur_decay_value == pytest.approx(decay ** k, rel=1e-12)


def test_k_steps_at_one_weight_are_k_single_steps():
    """Between updates the weights did not move: the one update equals k per-step updates."""
    from t2i.train.ema import StridedEMA

    k, steps = 4, 12
    p, q = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    ws = [w for w in trajectory(steps // k, seed=2) for _ in range(k)]
    strided = follow(StridedEMA([p], every=k, decay=0.99, foreach=True), p, ws)
    single = follow(StridedEMA([q], every=1, decay=0.99, foreach=True), q, ws)
    assert all(torch.allclose(strided[i], single[i], rtol=1e-12, atol=1e-12) for i in range(k - 1, steps, k))


def test_ema_every_zero_is_one_line():
    from typer.testing import CliRunner

    import cli
    from t2i.train import TrainConfig

    with pytest.raises(UserError, match=r"^ema_every 0 is out of range: pass a whole number from 1 to"):
        TrainConfig(ema_every=0).validate()
    r = CliRunner().invoke(cli.app, ["train", "--out", "x", "--features", "y", "--ema-every", "0"])
    assert r.exit_code == 2 and r.output.strip() == "error: ema_every 0 is out of range: pass a whole number from 1 to 1000000"


def tiny_cfg(world, **kw):
    """test_t2i_recovery's tiny stage (its world: 128 rows), 8 steps, the EMA every 2nd of them."""
    return recovery_cfg(world, **{"steps": 8, "warmup_steps": 2, "ema_decay": 0.9, "ema_every": 2, **kw})


def ema_of(ck: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(ck) / "ema.safetensors")


def test_resume_at_an_odd_step_gives_the_same_ema(world, tmp_path):
    """ema_every 2, stopped at step 5 (its EMA last moved at 4), resumed to 8: the EMA of the run
    that never stopped, bit for bit; a resume with another ema_every is taken, as another ema_decay."""
    from t2i.stage import run_stage
    from t2i.train import train

    full = run_stage(tiny_cfg(world), tmp_path / "full", shards=world["captions"], features=world["features"], progress=False)
    part = run_stage(tiny_cfg(world), tmp_path / "part", shards=world["captions"], features=world["features"], stop_after=5,
                     progress=False)
    assert part["step"] == 5
    resumed = train(tiny_cfg(world), tmp_path / "part", features=world["features"], resume=True, progress=False)
    assert resumed["start_step"] == 5 and resumed["step"] == 8
    a, b = ema_of(full["checkpoint"]), ema_of(resumed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at4 = ema_of(tmp_path / "full" / "checkpoints" / "step-0000004")
    at5 = ema_of(part["checkpoint"])
    assert all(torch.equal(at4[k], at5[k]) for k in at4)  # step 5 did not move it
    assert not all(torch.equal(at4[k], a[k]) for k in a)  # steps 6 and 8 did
    longer = train(tiny_cfg(world, steps=10, ema_every=4), tmp_path / "full", features=world["features"], resume=True,
                   progress=False)
    c = ema_of(longer["checkpoint"])
    assert longer["step"] == 10 and all(torch.equal(a[k], c[k]) for k in a)  # 4 moves it at 8 and 12, not at 9 or 10
