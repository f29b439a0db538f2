"""The features job's speed settings (issue 33): `channels_last` (the VAE in NHWC memory format)
and `compile_text` (the T5 encoder's blocks torch.compiled) change how the encoders run, not
what they write: the features equal the default settings' to float rounding, under the same
cache key; compact text features are the codec (t2i.text_codec) of the encoder's own output,
quantised where the encoder runs, compiled or not."""

import numpy as np
import pytest
import torch

from t2i.text_codec import encode

torch.set_num_threads(1)

CAPTIONS = ["a red square on a blue ground", "two circles", "a small green triangle beside a large yellow square",
            "stripes", "a blue circle above a red line"]


@pytest.fixture(scope="module")
def world(simple_world, tmp_path_factory):
    return {**simple_world, "root": tmp_path_factory.mktemp("speed")}


def fcfg(world, **kw):
    from t2i.features import FeatureConfig

    return FeatureConfig(vae=world["vae"], text_encoder=world["text_encoder"], resolution=16, max_tokens=16, **kw)


def encoder(world, **kw):
    """A FeatureEncoder (no writer: nothing is written) holding freshly loaded tiny models."""
    from t2i.encoders import load_text_encoder, load_vae
    from t2i.feature_encoder import FeatureEncoder

    enc = FeatureEncoder(None, fcfg(world, **kw), "cpu")
    enc.use_models(load_vae(world["vae"]), *load_text_encoder(world["text_encoder"]))
    return enc


def test_speed_settings_keep_the_cache_key_and_set_up_the_models(world):
    assert fcfg(world).cache_key() == fcfg(world, channels_last=True, compile_text=True, compile_vae=True).cache_key()
    on, off = encoder(world, channels_last=True, compile_text=True, compile_vae=True), encoder(world)
    assert on.models[0].encoder._compiled_call_impl is not None and off.models[0].encoder._compiled_call_impl is None
    convs = lambda e: [m.weight for m in e.models[0].modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs(on))
    assert all(not w.is_contiguous() for w in convs(on) if w.shape[-1] > 1)  # a 1x1 kernel is both
    assert all(w.is_contiguous() for w in convs(off))
    assert all(b._compiled_call_impl is not None for b in on.models[2].encoder.block)
    assert all(b._compiled_call_impl is None for b in off.models[2].encoder.block)
    from t2i.encoders import compile_text_encoder

    impls = [b._compiled_call_impl for b in on.models[2].encoder.block]
    compile_text_encoder(on.models[2])  # compiled already: kept as it is (a new wrapper would recompile)
    assert [b._compiled_call_impl for b in on.models[2].encoder.block] == impls


@pytest.mark.parametrize("way", [{"channels_last": True}, {"compile_vae": True}, {"channels_last": True, "compile_vae": True}])
def test_channels_last_and_compiled_vae_latents_equal_nchw_eager_in_nchw_order(world, way):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        (m0, s0), (m1, s1) = (encoder(world, **kw)._encode_latents(x) for kw in ({}, way))
    assert m1.is_contiguous() and s1.is_contiguous() and m1.shape == m0.shape and m1.shape[:2] == (3, 4)
    assert not torch.equal(m1, torch.zeros_like(m1))
    torch.testing.assert_close(m1, m0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-4, atol=1e-5)


def test_compact_codes_are_the_codec_of_the_encoder_output_compiled_or_not(world):
    """int8 codes and scales as the job stores them: exactly text_codec.encode of the eager
    encoder's float features; through the compiled blocks (two batch sizes: one recompile) at
    most one code step away, where float rounding moves a value across a rounding boundary."""
    from t2i.encoders import encode_text

    eager, compiled = encoder(world, text_dtype="int8"), encoder(world, text_dtype="int8", compile_text=True)
    for captions in (CAPTIONS, CAPTIONS[:3]):
        codes, mask, scales = eager._store_text(*eager.models[1:], captions)
        emb, ref_mask = encode_text(*eager.models[1:], captions, 16)
        ref_codes, ref_scales = encode(emb.cpu(), "int8")
        assert torch.equal(mask, ref_mask) and torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
        c_codes, c_mask, c_scales = compiled._store_text(*compiled.models[1:], captions)
        assert torch.equal(c_mask, mask)
        torch.testing.assert_close(c_scales, scales, rtol=1e-5, atol=0)
        step = (c_codes.view(torch.int8).int() - codes.view(torch.int8).int()).abs()
        assert step.max() <= 1 and (step > 0).float().mean() < 0.01


def test_features_with_both_settings_equal_the_defaults(world):
    """The whole job (compute_features) with channels_last and compile_text: the same directory
    name, every row's latents and (float32) text features equal the defaults' to rounding."""
    from t2i.data import StreamingFeatureDataset
    from t2i.features import compute_features

    dirs = [compute_features(world["captions"], world["root"] / name, fcfg(world, text_dtype="float32", **kw), progress=False)["dir"]
            for name, kw in (("default", {}), ("fast", {"channels_last": True, "compile_text": True}))]
    assert dirs[0].rsplit("/", 1)[1] == dirs[1].rsplit("/", 1)[1]
    idx = np.arange(96)
    a, b = (StreamingFeatureDataset(d, 16).get(idx) for d in dirs)
    assert a.keys == b.keys and torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.latent_mean, a.latent_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.latent_std, a.latent_std, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.text, a.text, rtol=1e-4, atol=1e-5)
