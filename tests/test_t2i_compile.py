"""Regional torch.compile of the transformer blocks and the SDPA kernel order (issue 17's GPU
fixes), checked on CPU through dynamo + AOT autograd (no C++ code generation)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from shards.errors import UserError
from t2i.models import Preset, PixArtWithNull, attention_kernels, build_transformer, compile_blocks
from t2i.train import TrainConfig


def _model(depth: int, seed: int = 0) -> PixArtWithNull:
    torch.manual_seed(seed)
    return PixArtWithNull(build_transformer(Preset(depth=depth, hidden=64, heads=4, patch=2), 8, 32), 16)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 400, 999]), torch.randn(3, 16, 32, generator=g),
            torch.tensor([[1] * 10 + [0] * 6, [1] * 16, [1] * 3 + [0] * 13]))


def _loss_and_grads(model: PixArtWithNull):
    x, t, cap, mask = _inputs()
    out = model(x, t, cap, mask, drop=torch.tensor([False, True, False]))
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_match_eager_and_keep_state_dict_keys():
    eager, compiled = _model(3), _model(3)
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == keys  # checkpoints and export see the same names
    out_e, grads_e = _loss_and_grads(eager)
    out_c, grads_c = _loss_and_grads(compiled)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_one_compiled_graph_serves_every_block():
    graphs = {}
    for depth in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        model = _model(depth)
        compile_blocks(model, backend="aot_eager")
        _loss_and_grads(model)
        graphs[depth] = counters["stats"]["unique_graphs"]
    assert graphs[2] >= 1
    assert graphs[6] == graphs[2], f"compile work grew with depth: {graphs}"


def test_attention_order_is_validated_and_applied():
    with pytest.raises(UserError, match="attention 'fastest' is not one of"):
        TrainConfig(preset="PixArt-tiny/2", attention="fastest").validate()
    model = _model(2)
    x, t, cap, mask = _inputs()
    ref = model(x, t, cap, mask)
    for name in ("flash", "efficient", "cudnn", "auto"):
        with torch.no_grad(), attention_kernels(name):  # CPU falls through the order to a kernel it has
            torch.testing.assert_close(model(x, t, cap, mask), ref.detach(), rtol=1e-5, atol=1e-6)
