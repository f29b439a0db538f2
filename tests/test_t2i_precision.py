"""Issue 33's step levers on CPU (t2i.precision): `param_dtype = "bfloat16"` (bf16 weights and
residual stream, fp32 master weights, through FSDP2's mixed precision on a one-rank group) and
`float8` (torchao's Float8Linear in the blocks). What the GPU measures is their speed; here, that
they compute what they claim, train, checkpoint in fp32 and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shards.errors import UserError
from test_t2i_train import losses, tiny_cfg, world  # noqa: F401 - world is a fixture

torch.set_num_threads(1)


def test_settings_are_checked_in_one_line(world):
    with pytest.raises(UserError, match="param_dtype 'float16' is not one of float32, bfloat16"):
        tiny_cfg(world, param_dtype="float16").validate()
    with pytest.raises(UserError, match="set mixed_precision = \"bf16\""):
        tiny_cfg(world, param_dtype="bfloat16").validate()
    with pytest.raises(UserError, match="param_dtype bfloat16 with lora_rank"):
        tiny_cfg(world, param_dtype="bfloat16", mixed_precision="bf16", lora_rank=4).validate()
    tiny_cfg(world, param_dtype="bfloat16", mixed_precision="bf16", float8=True).validate()


def test_bf16_params_run_a_bf16_residual_stream_on_fp32_master_weights(world, tmp_path):
    """Block outputs are bf16 while AdamW, the EMA and the checkpoint hold fp32; the run trains
    (its loss falls) and its losses follow the fp32-weight run's to bf16 precision."""
    from t2i.stage import run_stage

    feats, seen = tmp_path / "features", {}
    original = torch.nn.Module.__call__

    def spy(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if type(module).__name__.endswith("BasicTransformerBlock") and torch.is_tensor(out):
            seen.setdefault("block", out.dtype)
        return out

    common = dict(steps=12, mixed_precision="bf16", checkpoint_every=12)
    ref = run_stage(tiny_cfg(world, **common), tmp_path / "fp32", shards=world["captions"], features=feats, progress=False)
    torch.nn.Module.__call__ = spy
    try:
        run = run_stage(tiny_cfg(world, param_dtype="bfloat16", **common), tmp_path / "bf16", features=feats, progress=False)
    finally:
        torch.nn.Module.__call__ = original
    assert seen["block"] == torch.bfloat16  # the residual stream between blocks
    ema, model = (load_file(Path(run["checkpoint"]) / f"{w}.safetensors") for w in ("ema", "model"))
    assert {t.dtype for t in ema.values()} == {t.dtype for t in model.values()} == {torch.float32}
    assert model.keys() == load_file(Path(ref["checkpoint"]) / "model.safetensors").keys()
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert all(abs(x - y) < 1e-3 * x for x, y in zip(a, b))  # measured: within 2e-5 relative over 12 steps
    assert sum(b[-3:]) < 0.95 * sum(b[:3])  # it trains (by 11% in these 12 steps)


def test_bf16_params_resume_exactly(world, tmp_path):
    from t2i.stage import run_stage
    from t2i.train import train

    feats = tmp_path / "features"
    cfg = lambda: tiny_cfg(world, param_dtype="bfloat16", mixed_precision="bf16", steps=8, checkpoint_every=3)  # noqa: E731
    full = run_stage(cfg(), tmp_path / "full", shards=world["captions"], features=feats, progress=False)
    run_stage(cfg(), tmp_path / "part", features=feats, stop_after=3, progress=False)
    resumed = train(cfg(), tmp_path / "part", features=feats, resume=True, progress=False)
    assert resumed["start_step"] == 3 and losses(tmp_path / "full") == losses(tmp_path / "part")
    wa, wb = (load_file(Path(r["checkpoint"]) / "ema.safetensors") for r in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_float8_swaps_the_block_linears_and_keeps_the_checkpoint_format(world, tmp_path, monkeypatch):
    """torchao's Float8Linear in the blocks (CPU has float8 matmuls in this torch): the same
    state-dict keys, outputs close to the plain model's, and a stage that trains. Needs the fp8
    extra (torchao), which scripts/test.sh installs."""
    from t2i.models import Preset, PixArtWithNull, build_transformer
    from t2i.precision import convert_float8
    from t2i.stage import run_stage

    torch.manual_seed(0)
    plain = PixArtWithNull(build_transformer(Preset(depth=2, hidden=64, heads=4, patch=2), 8, 32), 16)
    with torch.no_grad():  # PixArt zero-initialises its output layers: random weights everywhere instead
        for p in plain.parameters():
            p.normal_(0, 0.1)
    fp8 = PixArtWithNull(build_transformer(Preset(depth=2, hidden=64, heads=4, patch=2), 8, 32), 16)
    fp8.load_state_dict(plain.state_dict())
    assert convert_float8(fp8.transformer) == 2 * 10  # per block: q, k, v, out in both attentions; the MLP's two
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    x, cap = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 16, 32, generator=g)
    t, mask = torch.tensor([0, 400, 999]), torch.ones(3, 16, dtype=torch.long)
    with torch.no_grad():
        ref, out = plain(x, t, cap, mask), fp8(x, t, cap, mask)
    assert 0 < (out - ref).norm() < 0.1 * ref.norm()  # measured 2.9%: e4m3's 3 mantissa bits, per-tensor scales
    from torchao.float8.float8_linear import Float8Linear

    calls, forward = [], Float8Linear.forward
    monkeypatch.setattr(Float8Linear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    # mixed_precision "no" after the stages above trained in bf16 in this process: each stage has its own
    run = run_stage(tiny_cfg(world, float8=True, mixed_precision="no", steps=12, checkpoint_every=12), tmp_path / "fp8",
                    shards=world["captions"], features=tmp_path / "features", progress=False)
    assert len(calls) >= 12 * 20  # every step ran its blocks' linears in float8 (tiny: 2 blocks x 10)
    loss = losses(tmp_path / "fp8")
    assert sum(loss[-3:]) < 0.95 * sum(loss[:3])
    assert json.loads((Path(run["checkpoint"]) / "trainer_state.json").read_text())["config"]["float8"] is True


def test_stages_of_one_process_each_train_in_their_own_mixed_precision(world, tmp_path):
    """A manifest's stages run in one process, and accelerate keeps one state per process: a
    stage in bf16 after one without mixed precision (and back) gets its own."""
    from accelerate.state import AcceleratorState

    from t2i.stage import run_stage

    for i, mp in enumerate(("no", "bf16", "no")):
        run_stage(tiny_cfg(world, mixed_precision=mp, steps=2, checkpoint_every=2), tmp_path / f"s{i}",
                  shards=world["captions"], features=tmp_path / "features", progress=False)
        assert AcceleratorState().mixed_precision == mp
