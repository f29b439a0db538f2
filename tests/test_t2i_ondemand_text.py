"""Text encoded on demand (issue 31, t2i.text_ondemand): text_dtype ids stores each caption
field's T5 token ids (int32, the kept tokens only) and the training step encodes them with the
frozen text encoder. The features equal the stored float16 ones to float16 rounding; a run on ids
gives the float16 run's losses to a stated tolerance; it resumes exactly; a resume that switches
to or from ids is refused in one line; bad settings are one line, exit 2."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)

# float16 rounding of a stored feature x: |f16(x) - x| <= |x| 2^-11 (normal) or 2^-25 (subnormal)
# + float32 arithmetic of two encoder forwards (a whole batch padded to max_tokens for the stored
# features, the tokens up to the longest caption on demand)
F16 = 2.0**-11


def f16_bound(x: np.ndarray) -> np.ndarray:
    return np.abs(x) * F16 + 2.0**-24 + np.abs(x).max(-1, keepdims=True) * 1e-5


@pytest.fixture(scope="module")
def world(simple_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ondemand")
    return {**simple_world, "root": root, "feats": root / "feats"}


def fcfg(world, **kw):
    from t2i.features import FeatureConfig

    return FeatureConfig(vae=world["vae"], text_encoder=world["text_encoder"], resolution=16, max_tokens=16, **kw)


def test_ids_encoded_on_demand_equal_the_stored_float16_features(world):
    from t2i.data import StreamingFeatureDataset
    from t2i.features import compute_features
    from t2i.text_ondemand import OnDemandText

    dirs = {d: compute_features(world["captions"], world["feats"], fcfg(world, text_dtype=d), progress=False)["dir"]
            for d in ("float16", "ids")}
    assert dirs["float16"] != dirs["ids"]  # the dtype is part of the cache key
    idx = np.arange(40)
    ref, b = StreamingFeatureDataset(dirs["float16"], 16).get(idx), StreamingFeatureDataset(dirs["ids"], 16).get(idx)
    assert b.text.dtype == torch.int32 and b.text.shape == (40, 16, 1) and torch.equal(b.mask, ref.mask)
    assert not b.text[b.mask == 0].any() and torch.equal(b.latent_mean, ref.latent_mean)
    t, f16 = (pq.read_table(next(Path(dirs[d]).glob("*.parquet"))) for d in ("ids", "float16"))
    n, channels = t.column("text_len")[0].as_py(), f16.column("text_channels")[0].as_py()
    assert len(t.column("text_emb")[0].as_py()) == 4 * n and t.column("text_channels")[0].as_py() == 1  # 4 bytes a kept token
    assert len(f16.column("text_emb")[0].as_py()) == 2 * n * channels
    text = OnDemandText(world["text_encoder"], "cpu")
    got = text(b)
    assert got.text.dtype == torch.float32 and got.text.shape == ref.text.shape and got.keys == ref.keys
    x, y = got.text.numpy(), ref.text.float().numpy()
    assert (np.abs(y - x) <= f16_bound(x)).all()
    assert not x[ref.mask.numpy() == 0].any()  # zero past the mask, as stored features are


def test_ids_of_several_caption_fields(tmp_path):
    """Each caption field stores its own ids; the field a sample draws is the one encoded."""
    from test_t2i_caption_fields import FIELDS, NO_SHORT, write_two_field_world

    from t2i.data import StreamingFeatureDataset
    from t2i.features import FeatureConfig, compute_features
    from t2i.text_ondemand import OnDemandText
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus

    models = build_tiny_models(tmp_path / "models", simple_corpus(), vae_fit_steps=0)
    write_two_field_world(tmp_path / "captions")
    dirs = {}
    for d in ("float32", "ids"):
        cfg = FeatureConfig(vae=models["vae"], text_encoder=models["text_encoder"], resolution=16, max_tokens=16, text_dtype=d,
                            caption_fields=FIELDS, batch_size=8)
        dirs[d] = compute_features(tmp_path / "captions", tmp_path / "feats", cfg, progress=False)["dir"]
    text = OnDemandText(models["text_encoder"], "cpu")
    idx = np.array([i for i in range(20) if i not in NO_SHORT])
    for field in (0, 1):
        ids = np.full(len(idx), field, np.uint8)
        ref, b = (StreamingFeatureDataset(dirs[d], 16, FIELDS).get(idx, ids) for d in ("float32", "ids"))
        assert b.caption_fields == ref.caption_fields == [FIELDS[field]] * len(idx) and torch.equal(b.mask, ref.mask)
        x = ref.text.numpy()
        assert np.allclose(text(b).text.numpy(), x, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="ids", batch_size=16, steps=6, lr=1e-3, warmup_steps=2, grad_clip=1.0, checkpoint_every=3,
                log_every=1, seed=3, loader_workers=0, val_keys=8, caption_dropout=0.2)
    base.update(kw)
    return TrainConfig(**base)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# a run on ids against one on stored float16 features: the features differ by float16's rounding
# (|x| 2^-11); measured on this tiny model (6 steps, 8 held-out keys): 1.2e-7 relative in the training
# losses, 8e-8 in the validation loss; the bound leaves room for other CPUs and torch versions
LOSS_RTOL = 1e-4


def test_training_on_ids_matches_float16_features_and_resumes_exactly(world, tmp_path):
    from t2i.stage import run_stage
    from t2i.train import train

    feats = world["feats"]
    ref = run_stage(tiny_cfg(world, text_dtype="float16"), tmp_path / "f16", shards=world["captions"], features=feats, progress=False)
    # the full run reads through loader workers (the shared-memory ring), the interrupted one in process
    full = run_stage(tiny_cfg(world, loader_workers=1), tmp_path / "full", shards=world["captions"], features=feats, progress=False)
    assert ref["step"] == full["step"] == 6
    a, r = log(tmp_path / "full"), log(tmp_path / "f16")
    for k in ("loss", "val_loss"):
        x, y = np.array([e[k] for e in a if k in e]), np.array([e[k] for e in r if k in e])
        assert len(x) == len(y) > 0 and np.isfinite(x).all()
        rel = np.abs(x - y) / np.abs(y)
        print(f"ids vs float16 {k}: max relative difference {rel.max():.2e}")
        assert (rel <= LOSS_RTOL).all(), (k, rel)
    part = run_stage(tiny_cfg(world), tmp_path / "part", shards=world["captions"], features=feats, stop_after=4, progress=False)
    assert part["step"] == 4
    resumed = train(tiny_cfg(world), tmp_path / "part", features=feats, resume=True, progress=False)
    assert resumed["start_step"] == 4 and resumed["step"] == 6
    assert [e["loss"] for e in a] == [e["loss"] for e in log(tmp_path / "part")]
    assert [e.get("val_loss") for e in a] == [e.get("val_loss") for e in log(tmp_path / "part")]
    for out, theirs, ours in ((tmp_path / "part", "ids", "float16"), (tmp_path / "f16", "float16", "ids")):
        with pytest.raises(UserError, match=f"trained on features with text_dtype {theirs}, this run has {ours}") as e:
            train(tiny_cfg(world, text_dtype=ours), out, features=feats, resume=True, progress=False)
        assert "\n" not in str(e.value)


def test_bad_settings_for_ids_are_one_line(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--text-dtype", "id"])
    assert r.exit_code == 2 and "'id' is not one of float32, float16, bfloat16, int8, fp8, ids" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    # ids with a text encoder that is not there: one line from the training step's encoder load
    r = CliRunner().invoke(cli.app, ["train", "--shards", str(world["captions"]), "--out", str(tmp_path / "o2"),
                                     "--preset", "PixArt-tiny/2", "--resolution", "16",
                                     "--vae", world["vae"], "--text-encoder", str(tmp_path / "nothing"), "--text-dtype", "ids"])
    assert r.exit_code == 2 and "nothing" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    # the training step's own load (through t2i.encoders, as the features job's): one line
    from t2i.text_ondemand import OnDemandText

    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "nothing", tmp_path / "empty", world["vae"]):
        with pytest.raises(UserError) as e:
            OnDemandText(str(where), "cpu")
        assert "\n" not in str(e.value) and "text encoder" in str(e.value), str(e.value)


def test_repa_and_token_drop_on_ids_match_float16(world, tmp_path):
    """REPA (stored teacher tokens) and token routing run on ids as on stored features."""
    from demo.teacher import SHIPPED_TEACHER
    from t2i.stage import run_stage

    levers = dict(teacher=str(SHIPPED_TEACHER), repa_weight=0.5, token_drop=0.5, token_drop_start=1, token_drop_end=2, steps=3,
                  val_keys=0)
    for d in ("float16", "ids"):
        run_stage(tiny_cfg(world, text_dtype=d, **levers), tmp_path / d, shards=world["captions"], features=world["feats"],
                  progress=False)
    a, r = log(tmp_path / "ids"), log(tmp_path / "float16")
    for k in ("loss", "repa"):
        x, y = np.array([e[k] for e in a]), np.array([e[k] for e in r])
        assert len(x) == 3 and np.isfinite(x).all() and (np.abs(x - y) <= LOSS_RTOL * np.abs(y)).all(), (k, x, y)
