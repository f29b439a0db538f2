"""The trainer end to end on CPU with tiny local models: features -> train -> checkpoint ->
resume -> sample -> export -> PixArtAlphaPipeline.from_pretrained, plus bad-input errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shards import CaptionRow, ShardWriter
from shards.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("t2i")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=150)
    write_simple_world(root / "captions", 256, rows_per_shard=100)
    return {"root": root, "captions": root / "captions", **models}


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="float32", batch_size=32, steps=12, lr=1e-3, warmup_steps=5, grad_clip=1.0,
                checkpoint_every=6, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines()]


def test_features_are_cached_and_resumable(world, tmp_path):
    from t2i.data import StreamingFeatureDataset
    from t2i.features import FeatureConfig, compute_features

    cfg = FeatureConfig(vae=world["vae"], text_encoder=world["text_encoder"], resolution=16, max_tokens=16, text_dtype="float32")
    r1 = compute_features(world["captions"], tmp_path, cfg, progress=False)
    assert r1["rows"] == 256 and r1["new"] == 256
    r2 = compute_features(world["captions"], tmp_path, cfg, progress=False)
    assert r2["new"] == 0 and r2["dir"] == r1["dir"]  # cached: nothing re-encoded
    other = FeatureConfig(vae=world["vae"], text_encoder=world["text_encoder"], resolution=32, max_tokens=16)
    assert other.cache_key() != cfg.cache_key()  # resolution is part of the cache key
    ds = StreamingFeatureDataset(r1["dir"], 16)
    b = ds.get(np.arange(4))
    assert b.latent_mean.shape == (4, 4, 8, 8) and b.text.shape == (4, 16, 32)
    assert b.mask.sum(1).tolist() == [7, 7, 7, 7]  # "a red circle on the left" + </s>
    # one epoch visits every sample exactly once
    idx = np.concatenate(ds.epoch_batches(0, 0, 30))
    assert sorted(idx.tolist()) == list(range(256))


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_continues_exactly(world, tmp_path, grad_accum):
    from safetensors.torch import load_file

    from t2i.stage import run_stage
    from t2i.train import train

    feats = tmp_path / "features"
    cfg = lambda: tiny_cfg(world, grad_accum=grad_accum)  # noqa: E731
    full = run_stage(cfg(), tmp_path / "full", shards=world["captions"], features=feats, progress=False)
    part = run_stage(cfg(), tmp_path / "part", shards=world["captions"], features=feats, stop_after=5, progress=False)
    assert part["step"] == 5  # mid-epoch: 8 micro-batches of 32 per epoch
    resumed = train(cfg(), tmp_path / "part", features=feats, resume=True, progress=False)
    assert resumed["start_step"] == 5 and resumed["step"] == 12 and full["epoch"] == resumed["epoch"] == (1 if grad_accum == 1 else 3)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(a) == len(b) == 12
    assert a == b  # identical data order, noise, optimizer state: identical losses
    wa = load_file(Path(full["checkpoint"]) / "ema.safetensors")
    wb = load_file(Path(resumed["checkpoint"]) / "ema.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rec = json.loads((tmp_path / "full" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "images_per_s", "mfu"} <= rec.keys()


def test_loader_workers_do_not_change_the_run(world, tmp_path):
    """Reading in the training process (0 workers) or in 2 loader workers: the same batches in
    the same order, so the same losses."""
    from t2i.stage import run_stage

    feats = tmp_path / "features"
    for workers in (0, 2):
        run_stage(tiny_cfg(world, steps=4, loader_workers=workers), tmp_path / f"w{workers}", shards=world["captions"], features=feats, progress=False)
    assert losses(tmp_path / "w0") == losses(tmp_path / "w2")


def test_train_opens_a_features_directory_and_computes_none(world, tmp_path, monkeypatch):
    """Issue 11: features are their own step (run_stage, with its own summary); train() only opens
    a features directory, given as the directory itself or as the root holding it."""
    from typer.testing import CliRunner

    import cli
    from t2i import features as features_mod
    from t2i.features import compute_features
    from t2i.stage import run_stage
    from t2i.train import train

    cfg = tiny_cfg(world, steps=2, checkpoint_every=2)
    staged = run_stage(cfg, tmp_path / "staged", shards=world["captions"], progress=False)
    assert staged["features_step"]["rows"] == 256 and staged["features_step"]["new"] == 256
    assert staged["skipped_images"] == 0 and staged["features"] == staged["features_step"]["dir"]

    made = compute_features(world["captions"], tmp_path / "feats", cfg.feature_config(), progress=False)

    def no_features(*a, **k):
        raise AssertionError("train() computed features")

    monkeypatch.setattr(features_mod, "compute_features", no_features)
    by_dir = train(tiny_cfg(world, steps=2, checkpoint_every=2), tmp_path / "a", features=made["dir"], progress=False)
    by_root = train(tiny_cfg(world, steps=2, checkpoint_every=2), tmp_path / "b", features=tmp_path / "feats", progress=False)
    assert by_dir["features"] == by_root["features"] == made["dir"] and by_dir["samples"] == 256
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    with pytest.raises(UserError, match=r"other settings \(resolution 16 \(this stage: 32\)"):
        train(tiny_cfg(world, resolution=32), tmp_path / "c", features=made["dir"], progress=False)
    with pytest.raises(UserError, match="no features for this stage's settings"):
        train(tiny_cfg(world), tmp_path / "d", progress=False)
    # the CLI without shards: the features' settings (max_tokens 16) differ from the defaults (120)
    r = CliRunner().invoke(cli.app, ["train", "--features", made["dir"], "--out", str(tmp_path / "e"), "--preset", "PixArt-tiny/2",
                                     "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--resolution", "16"])
    assert r.exit_code == 2 and "max_tokens 16 (this stage: 120)" in r.output and "Traceback" not in r.output, r.output


def test_sample_export_and_diffusers_pipeline(world, tmp_path):
    from diffusers import PixArtAlphaPipeline
    from PIL import Image

    from t2i.export import export, load_exported
    from t2i.sample import generate, sample
    from t2i.stage import run_stage

    run = run_stage(tiny_cfg(world, steps=6), tmp_path / "run", shards=world["captions"], progress=False)
    png = sample(tmp_path / "run", ["a red circle on the left", "a blue square on the right"], tmp_path / "grid.png", steps=4)
    assert Image.open(png).size == (32, 16)
    pipe_dir = export(run["checkpoint"], tmp_path / "pipe")
    # exactly what a user of the ecosystem does, no t2i code involved
    pipe = PixArtAlphaPipeline.from_pretrained(pipe_dir)
    assert pipe.transformer.config.out_channels == 8
    img = pipe("a green circle on the right", num_inference_steps=3, height=16, width=16, use_resolution_binning=False,
               clean_caption=False, max_sequence_length=16, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    # with the learned null caption as the unconditional branch, as in training
    pipe2, null = load_exported(pipe_dir, device="cpu")
    assert null.shape == (16, 32)
    from t2i.checkpoint import load_weights

    assert torch.allclose(null, load_weights(Path(run["checkpoint"]), "ema")["null_caption"])
    imgs = generate(pipe2, null, ["a red circle on the left"], steps=3)
    assert imgs[0].size == (16, 16)


def test_v_prediction_trains_samples_and_exports_with_its_scheduler(world, tmp_path):
    from diffusers import PixArtAlphaPipeline

    from t2i.export import export
    from t2i.sample import pipeline_from_checkpoint
    from t2i.stage import run_stage
    from t2i.train import TrainConfig

    run = run_stage(tiny_cfg(world, steps=6, prediction_type="v_prediction"), tmp_path / "run", shards=world["captions"], progress=False)
    assert all(np.isfinite(losses(tmp_path / "run")))
    pipe, _ = pipeline_from_checkpoint(run["checkpoint"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # an exported pipeline samples with the parametrisation it was trained with, outside t2i too
    assert PixArtAlphaPipeline.from_pretrained(export(run["checkpoint"], tmp_path / "pipe")).scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(UserError, match="prediction_type 'x0' is not one of epsilon, v_prediction"):
        TrainConfig(prediction_type="x0").validate()
    # continuing it as an epsilon model is allowed, with a warning that names the fix
    with pytest.warns(UserWarning, match="predicts v_prediction, this stage trains epsilon"):
        run_stage(tiny_cfg(world, steps=1, init=f"checkpoint:{run['checkpoint']}"), tmp_path / "eps", shards=world["captions"], progress=False)


def test_nan_loss_stops_with_last_checkpoint_intact(world, tmp_path, monkeypatch):
    from t2i import diffusion
    from t2i.checkpoint import latest_checkpoint
    from t2i.stage import run_stage
    from t2i.train import TrainingDiverged

    real = diffusion.Diffusion.loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > 8:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(diffusion.Diffusion, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 9.*step-0000006"):
        run_stage(tiny_cfg(world), tmp_path / "run", shards=world["captions"], progress=False)
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "step-0000006"
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 6


def test_bad_inputs_give_clear_errors(world, tmp_path):
    from t2i.manifest import parse_manifest
    from t2i.stage import run_stage
    from t2i.train import train

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no complete caption shards"):
        run_stage(tiny_cfg(world), tmp_path / "r0", shards=empty, progress=False)
    bad = tmp_path / "uncaptioned"
    w = ShardWriter(bad)
    w.add(CaptionRow(key="a", error="unreadable"))
    w.add(CaptionRow(key="b", caption=None))
    w.close()
    with pytest.raises(UserError, match="no rows with a caption"):
        run_stage(tiny_cfg(world), tmp_path / "r1", shards=bad, progress=False)
    with pytest.raises(UserError, match=r"unknown key\(s\) learning_rate"):
        parse_manifest('[[stages]]\nname = "a"\nlearning_rate = 1.0\n')
    with pytest.raises(UserError, match="should be int"):
        parse_manifest('[[stages]]\nname = "a"\nsteps = "many"\n')
    with pytest.raises(UserError, match="not divisible by patch x VAE factor"):
        run_stage(tiny_cfg(world, resolution=18), tmp_path / "r2", shards=world["captions"], progress=False)
    # a checkpoint of another preset: the error names the mismatched keys
    feats = tmp_path / "f"
    run_stage(tiny_cfg(world, steps=2, checkpoint_every=2), tmp_path / "r3", shards=world["captions"], features=feats, progress=False)
    with pytest.raises(UserError, match=r"transformer_blocks.0.ff.net.0.proj.weight|pos_embed.proj.weight"):
        train(tiny_cfg(world, preset="PixArt-tiny/4", steps=4), tmp_path / "r3", features=feats, resume=True, progress=False)


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "PixArt-tiny/2",
                                     "--vae", str(tmp_path), "--text-encoder", str(tmp_path), "--resolution", "16"])
    assert r.exit_code == 2
    assert "error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.app, ["train", "--manifest", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.output
    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o2"), "--prediction-type", "x0"])
    assert r.exit_code == 2 and "prediction_type 'x0' is not one of epsilon, v_prediction" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o3"), "--timestep-power", "0"])
    assert r.exit_code == 2 and "timestep_power must be > 0" in r.output and "Traceback" not in r.output


def test_images_from_recorded_sources(tmp_path):
    """Features read images from embedded bytes, plain files, tar members and parquet rows."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from shards.images import RowImageReader, decode_image

    def load_image(row):  # the bytes features reads for a row, under the shared decode policy
        return decode_image(RowImageReader().read(row)).image

    img = Image.new("RGB", (5, 3), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    (tmp_path / "a.png").write_bytes(data)
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        tf.add(tmp_path / "a.png", arcname="sa_1.png")
    pq.write_table(pa.table({"image": [{"bytes": b"junk"}, {"bytes": data}]}), tmp_path / "p.parquet")
    for row in ({"image": data}, {"source": str(tmp_path / "a.png")}, {"source": str(tmp_path / "s.tar"), "member": "sa_1.png"},
                {"source": str(tmp_path / "p.parquet"), "member": "1"}):
        got = load_image(row)
        assert got.size == (5, 3) and got.getpixel((0, 0)) == (200, 10, 10)


def test_aspect_ratio_buckets_one_bucket_per_batch(tmp_path):
    from t2i.data import StreamingFeatureDataset
    from t2i.features import FEATURE_SCHEMA
    from t2i.geometry import target_size

    assert target_size(1000, 1000, 256, buckets=False) == (256, 256)
    h, w = target_size(2000, 1000, 256, buckets=True)  # landscape 2:1 -> a wide bin
    assert w > h and abs(h / w - 0.5) < 0.1
    w_ = ShardWriter(tmp_path, schema=FEATURE_SCHEMA, prefix="features")
    for i in range(50):
        hh, ww = [(256, 256), (192, 320), (320, 192)][i % 3]
        w_.add({"key": f"k{i:03d}", "caption": "c", "height": hh, "width": ww, "latent_shape": [4, hh // 8, ww // 8],
                "latent_mean": np.zeros((4, hh // 8, ww // 8), np.float32).tobytes(),
                "latent_std": np.zeros((4, hh // 8, ww // 8), np.float32).tobytes(),
                "text_emb": np.zeros((2, 8), np.float32).tobytes(), "text_len": 2, "text_channels": 8, "text_dtype": "float32"})
    w_.close()
    ds = StreamingFeatureDataset(tmp_path, 4)
    batches = ds.epoch_batches(0, seed=1, batch_size=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    for b in batches:
        got = ds.get(b)
        assert got.latent_mean.shape[-2:] == (got.height // 8, got.width // 8)
    assert ds.epoch_batches(1, 1, 4)[0].tolist() != batches[0].tolist() or len(batches) == 1
    # two ranks: equal full shares, no index shared
    two = ds.epoch_batches(0, 1, 4, world_size=2)
    assert all(len(b) == 8 for b in two)


def test_features_job_leaves_the_loaders_index_cached(world, tmp_path, monkeypatch):
    """`t2i-data features` builds the loader's index once its directory is complete: training opens
    load it (no shard is read to index it, the cache is not rewritten), and it is the index the
    shards give."""
    from typer.testing import CliRunner

    import cli
    from t2i.data import StreamingFeatureDataset
    from t2i import feature_index
    from t2i.feature_index import INDEX_FILE
    from t2i.features import features_dir
    from t2i.train import train

    r = CliRunner().invoke(cli.app, ["features", "--shards", str(world["captions"]), "--out", str(tmp_path / "feats"), "--vae", world["vae"],
                                     "--text-encoder", world["text_encoder"], "--resolution", "16", "--max-tokens", "16", "--text-dtype", "float32",
                                     "--shard-size", "100"])
    assert r.exit_code == 0, r.output
    cfg = tiny_cfg(world, steps=1, checkpoint_every=1)
    cache = features_dir(tmp_path / "feats", cfg.feature_config()) / INDEX_FILE
    assert cache.is_file()
    written = cache.stat().st_mtime_ns
    built = []
    real = feature_index.index_shard
    monkeypatch.setattr(feature_index, "index_shard", lambda s, path, fields: built.append(path) or real(s, path, fields))
    cached = StreamingFeatureDataset(cache.parent, 16)
    train(cfg, tmp_path / "run", features=tmp_path / "feats", progress=False)
    assert built == [] and len(cached) == 256 and cache.stat().st_mtime_ns == written
    cache.unlink()
    rebuilt = StreamingFeatureDataset(cache.parent, 16)
    assert len(built) == 3  # 256 rows in shards of 100
    for name in ("shard", "group", "row", "bucket_of"):
        assert np.array_equal(getattr(rebuilt, name), getattr(cached, name)), name
    assert {k: v.tolist() for k, v in rebuilt.buckets.items()} == {k: v.tolist() for k, v in cached.buckets.items()}


def test_cli_end_to_end_with_manifest_and_dit_import(world, tmp_path):
    """The CI path through the CLI: import-dit -> train (tiny-cpu manifest, init from the import)
    -> resume -> sample -> export -> PixArtAlphaPipeline loads."""
    from diffusers import PixArtAlphaPipeline
    from typer.testing import CliRunner

    import cli
    from test_t2i_import_dit import random_official_dit

    run = CliRunner().invoke
    torch.save(random_official_dit(), tmp_path / "dit.pt")
    r = run(cli.app, ["import-dit", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "init"), "--caption-channels", "32", "--heads", "4"])
    assert r.exit_code == 0, r.output
    r = run(cli.app, ["features", "--shards", str(world["captions"]), "--out", str(tmp_path / "feats"), "--vae", world["vae"],
                      "--text-encoder", world["text_encoder"], "--resolution", "16", "--max-tokens", "16"])
    assert r.exit_code == 0 and "256 samples" in r.output, r.output
    common = ["--manifest", "manifests/tiny-cpu.toml", "--shards", str(world["captions"]), "--out", str(tmp_path / "runs"),
              "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--init", f"pixart:{tmp_path / 'init'}"]
    r = run(cli.app, ["train", *common, "--steps", "4"])
    assert r.exit_code == 0, r.output
    assert "stage tiny: step 4" in r.output
    r = run(cli.app, ["train", *common, "--steps", "8"])  # a longer target: resumes the stage
    assert r.exit_code == 0 and "stage tiny: step 8" in r.output, r.output
    steps = [json.loads(l)["step"] for l in (tmp_path / "runs" / "tiny" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    r = run(cli.app, ["sample", str(tmp_path / "runs" / "tiny"), "--prompt", "a red circle on the left", "--steps", "3", "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0 and (tmp_path / "g.png").exists(), r.output
    r = run(cli.app, ["export", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "pipe")])
    assert r.exit_code == 0, r.output
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.transformer.config.num_layers == 2
    r = run(cli.app, ["export", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "pipe")])
    assert r.exit_code == 2 and "exists and is not an empty directory" in r.output
