"""Compact text features (issue 31, t2i.text_codec): text_dtype int8 | fp8 stores one byte a value
and a float32 scale per token; the loader decodes to float16 within the stated bound of the
float16 features; the dtype is part of the cache key; training on them resumes exactly and a
resume that changes the dtype is refused in one line; bad dtypes are one line, exit 2."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards.errors import UserError
from t2i.text_codec import copy_compact, decode, encode

torch.set_num_threads(1)


def bound(x: np.ndarray, dtype: str) -> np.ndarray:
    """The stated bound (t2i.text_codec) of |decoded - x|, elementwise, plus the float16 rounding
    of the decoded value (|x| / 2048) and float32 arithmetic (absmax x 1e-6)."""
    absmax = np.abs(x).max(-1, keepdims=True)
    if dtype == "int8":
        return absmax / 254 + np.abs(x) / 2048 + absmax * 1e-6
    return np.abs(x) / 16 + absmax / 448 / 1024 + np.abs(x) / 2048 + absmax * 1e-6


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_codec_is_within_its_bound_at_t5_xxl_width(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4096, generator=g) * torch.rand(120, 1, generator=g) * 4
    x[:, 7] *= 40  # an outlier channel, as T5 has
    x[3] = 0  # an all-zero row decodes to zeros
    codes, scales = encode(x, dtype)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and scales.shape == (120,) and scales.dtype == torch.float32
    got = decode(codes.numpy(), scales.numpy(), dtype)
    assert got.dtype == np.float16 and not got[3].any()
    err = np.abs(got.astype(np.float32) - x.numpy())
    assert (err <= bound(x.numpy(), dtype)).all()
    # the loader's copy: the first n tokens of a row into a zero-padded float16 batch (raw bytes)
    out = np.full((2, 130, 4096 * 2), 255, np.uint8)
    offsets = lambda rows, width: np.array([0, rows * width], np.int32)  # noqa: E731
    copy_compact((offsets(100, 4096), codes[:100].numpy().ravel()), (offsets(100, 4), scales[:100].numpy().view(np.uint8)),
                 np.array([0]), np.array([100]), out, np.array([1]), dtype)
    text = out[1].view(np.float16)
    assert np.array_equal(text[:100], got[:100]) and not text[100:].any()


@pytest.fixture(scope="module")
def world(simple_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    return {**simple_world, "root": root, "feats": root / "feats"}


def fcfg(world, **kw):
    from t2i.features import FeatureConfig

    return FeatureConfig(vae=world["vae"], text_encoder=world["text_encoder"], resolution=16, max_tokens=16, **kw)


def test_compact_features_decode_within_the_bound_of_float16(world):
    from t2i.data import StreamingFeatureDataset
    from t2i.features import compute_features

    dirs = {d: compute_features(world["captions"], world["feats"], fcfg(world, text_dtype=d), progress=False)["dir"]
            for d in ("float16", "int8", "fp8")}
    assert len(set(dirs.values())) == 3  # the dtype is part of the cache key: three caches, none reused
    again = compute_features(world["captions"], world["feats"], fcfg(world, text_dtype="int8"), progress=False)
    assert again["new"] == 0 and again["dir"] == dirs["int8"]
    idx = np.arange(24)
    ref = StreamingFeatureDataset(dirs["float16"], 16).get(idx)
    for d in ("int8", "fp8"):
        b = StreamingFeatureDataset(dirs[d], 16).get(idx)
        assert b.text.dtype == torch.float16 and b.text.shape == ref.text.shape and torch.equal(b.mask, ref.mask)
        x, y = ref.text.float().numpy(), b.text.float().numpy()
        assert (np.abs(y - x) <= bound(x, d) + np.abs(x).max(-1, keepdims=True) / 1024).all()  # + float16's own rounding of x
        assert not y[ref.mask.numpy() == 0].any()  # padding stays zero
        assert torch.equal(b.latent_mean, ref.latent_mean)  # only the text is compact
        t, f16 = pq.read_table(next(Path(dirs[d]).glob("*.parquet"))), pq.read_table(next(Path(dirs["float16"]).glob("*.parquet")))
        n, channels = t.column("text_len")[0].as_py(), t.column("text_channels")[0].as_py()
        assert len(t.column("text_emb")[0].as_py()) == n * channels and len(t.column("text_scale")[0].as_py()) == 4 * n
        assert len(f16.column("text_emb")[0].as_py()) == 2 * n * channels and "text_scale" not in f16.column_names


def test_compact_features_of_several_caption_fields(tmp_path):
    """Each caption field keeps its own scales (text_scale_<field>); the loader decodes the field
    a sample trains on, within the bound of the float32 features."""
    from test_t2i_caption_fields import FIELDS, NO_SHORT, write_two_field_world

    from t2i.data import StreamingFeatureDataset
    from t2i.features import FeatureConfig, compute_features
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus

    models = build_tiny_models(tmp_path / "models", simple_corpus(), vae_fit_steps=0)
    write_two_field_world(tmp_path / "captions")
    dirs = {}
    for d in ("float32", "fp8"):
        cfg = FeatureConfig(vae=models["vae"], text_encoder=models["text_encoder"], resolution=16, max_tokens=16, text_dtype=d,
                            caption_fields=FIELDS, batch_size=8)
        dirs[d] = compute_features(tmp_path / "captions", tmp_path / "feats", cfg, progress=False)["dir"]
    assert {"text_scale", "text_scale_caption_short"} <= set(pq.read_schema(next(Path(dirs["fp8"]).glob("*.parquet"))).names)
    idx = np.array([i for i in range(20) if i not in NO_SHORT])
    for field in (0, 1):
        ids = np.full(len(idx), field, np.uint8)
        ref, b = (StreamingFeatureDataset(dirs[d], 16, FIELDS).get(idx, ids) for d in ("float32", "fp8"))
        assert b.caption_fields == ref.caption_fields == [FIELDS[field]] * len(idx) and torch.equal(b.mask, ref.mask)
        x = ref.text.numpy()
        assert (np.abs(b.text.float().numpy() - x) <= bound(x, "fp8")).all()


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="int8", batch_size=16, steps=6, lr=1e-3, warmup_steps=2, grad_clip=1.0, checkpoint_every=3,
                log_every=1, seed=3, loader_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines()]


def test_training_on_compact_features_resumes_exactly_and_refuses_another_dtype(world, tmp_path):
    from typer.testing import CliRunner

    import cli
    from t2i.stage import run_stage
    from t2i.train import train

    feats = world["feats"]
    # the full run reads through loader workers (the shared-memory ring), the interrupted one in process
    full = run_stage(tiny_cfg(world, loader_workers=1), tmp_path / "full", shards=world["captions"], features=feats, progress=False)
    part = run_stage(tiny_cfg(world), tmp_path / "part", shards=world["captions"], features=feats, stop_after=4, progress=False)
    assert part["step"] == 4
    resumed = train(tiny_cfg(world), tmp_path / "part", features=feats, resume=True, progress=False)
    assert resumed["start_step"] == 4 and resumed["step"] == 6
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == 6 and a == b and all(np.isfinite(a))
    for changed in ("float16", "fp8"):
        with pytest.raises(UserError, match=f"trained on features with text_dtype int8, this run has {changed}") as e:
            train(tiny_cfg(world, text_dtype=changed), tmp_path / "part", features=feats, resume=True, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="text_dtype int8, this run has float16"):  # before any features are made for it
        run_stage(tiny_cfg(world, text_dtype="float16"), tmp_path / "part", shards=world["captions"], features=tmp_path / "f2",
                  resume=True, progress=False)
    assert not (tmp_path / "f2").exists()
    r = CliRunner().invoke(cli.app, ["train", "--out", str(tmp_path / "part"), "--features", str(feats), "--resume",
                                     "--preset", "PixArt-tiny/2", "--resolution", "16", "--vae", world["vae"],
                                     "--text-encoder", world["text_encoder"], "--text-dtype", "fp8"])
    assert r.exit_code == 2 and "text_dtype int8, this run has fp8" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("command", ["features", "train"])
def test_bad_text_dtype_is_one_line_before_any_work(tmp_path, command):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, [command, "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--text-dtype", "int4"])
    assert r.exit_code == 2 and "'int4' is not one of float32, float16, bfloat16, int8, fp8, ids" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output and not (tmp_path / "o").exists(), r.output
