"""Several captions per image (issue 15, Sana-style): features encodes each chosen caption field
once per image, the loader trains each sample on one field per epoch in the configured
proportions, resume stays exact, bad fields are one-line errors, and the default is unchanged."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards import CaptionRow, ShardWriter, complete_shards
from shards.errors import UserError

torch.set_num_threads(1)

FIELDS = ("caption", "caption_short")
N_ROWS, NO_SHORT, ERRORED = 64, {3, 10, 17, 24, 31, 38, 45, 52}, 60  # rows without caption_short; a row with an error


def write_two_field_world(out: Path, size: int = 16) -> dict[str, dict]:
    """Caption shards whose rows have a dense `caption` and a different `caption_short`, as
    `t2i-data caption --prompts dense,short` writes them; some rows lack the short one, one
    errored. Returns the rows by key."""
    from tiny.world import render, short_caption, simple_scene

    rng = np.random.default_rng(1)
    w = ShardWriter(out, rows_per_shard=20, writer_id="0000f1e1")
    rows = {}
    for i in range(N_ROWS):
        scene = simple_scene(rng)
        buf = io.BytesIO()
        render(scene, size).save(buf, format="PNG")
        short = None if i in NO_SHORT else f"{scene.color} {scene.shape}"
        row = CaptionRow(key=f"k{i:03d}", caption=short_caption(scene), caption_short=short,
                         width=size, height=size, image=buf.getvalue(), model="synthetic")
        if i == ERRORED:
            row.caption, row.caption_short, row.error = None, None, "captioning failed"
        rows[row.key] = row.__dict__
        w.add(row)
    w.close()
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from t2i.features import FeatureConfig, compute_features
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus

    root = tmp_path_factory.mktemp("fields")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=0)
    rows = write_two_field_world(root / "captions")
    cfg = FeatureConfig(vae=models["vae"], text_encoder=models["text_encoder"], resolution=16, max_tokens=16,
                        text_dtype="float32", caption_fields=FIELDS, batch_size=8, rows_per_shard=25)
    summary = compute_features(root / "captions", root / "features", cfg, progress=False)
    return {"root": root, "rows": rows, "features": Path(summary["dir"]), "summary": summary, "feature_cfg": cfg, **models}


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="float32", batch_size=16, steps=10, lr=1e-3, warmup_steps=3, grad_clip=1.0, checkpoint_every=5,
                log_every=1, seed=3, loader_workers=0, caption_fields=list(FIELDS), caption_weights=[3, 1])
    base.update(kw)
    return TrainConfig(**base)


def feature_rows(fdir: Path) -> dict[str, dict]:
    return {r["key"]: r for s in complete_shards(fdir) for r in pq.read_table(s).to_pylist()}


def t5(world, text: str) -> np.ndarray:
    """`text`'s T5 features as features stores them (the kept tokens only)."""
    from t2i.encoders import encode_text, load_text_encoder

    tok, enc = load_text_encoder(world["text_encoder"])
    emb, mask = encode_text(tok, enc, [text], 16)
    return emb[0, : int(mask.sum())].numpy()


def stored(row: dict, emb: str) -> np.ndarray:
    return np.frombuffer(row[emb], np.float32).reshape(-1, row["text_channels"])


def test_features_encode_every_field_of_every_image(world):
    s, rows = world["summary"], world["rows"]
    assert (s["rows"], s["new"], s["skipped_invalid"], s["failed"]) == (N_ROWS - 1, N_ROWS - 1, 1, 0)
    assert s["missing_fields"] == {"caption_short": len(NO_SHORT)}  # skipped for those images, counted
    got = feature_rows(world["features"])
    assert set(got) == set(rows) - {f"k{ERRORED:03d}"}
    for key, r in got.items():
        i = int(key[1:])
        assert r["caption"] == rows[key]["caption"] and r["caption_short"] == rows[key]["caption_short"]
        np.testing.assert_allclose(stored(r, "text_emb"), t5(world, rows[key]["caption"]), rtol=1e-5, atol=1e-6)
        if i in NO_SHORT:
            assert r["text_emb_caption_short"] is None and r["text_len_caption_short"] is None
            continue
        short = stored(r, "text_emb_caption_short")
        np.testing.assert_allclose(short, t5(world, rows[key]["caption_short"]), rtol=1e-5, atol=1e-6)
        assert r["text_len_caption_short"] == len(short) < r["text_len"]  # the two texts differ: so do their features
    assert json.loads((world["features"] / "config.json").read_text())["caption_fields"] == list(FIELDS)


def test_loader_trains_on_each_field_in_the_configured_proportions(world):
    """Counted through the loader over 30 epochs: the images with both fields get caption_short
    about a quarter of the time (weights 3:1), the others always caption; every batch's text is
    the stored features of the field it names; the draw is the same with loader workers."""
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    ds = StreamingFeatureDataset(world["features"], 16, FIELDS, (3, 1))
    got = feature_rows(world["features"])
    counts: dict[str, Counter] = {}
    batches = list(make_loader(ds, 0, 5, 16, workers=0, epochs=30))
    for b in batches:
        for k, f in zip(b.keys, b.caption_fields):
            counts.setdefault(k, Counter())[f] += 1
    both = [k for k in counts if int(k[1:]) not in NO_SHORT]
    short = sum(counts[k]["caption_short"] for k in both) / sum(sum(counts[k].values()) for k in both)
    assert 0.2 < short < 0.3, short
    assert all(counts[k]["caption_short"] == 0 for k in counts if int(k[1:]) in NO_SHORT)
    assert sum(1 for k in both if len(counts[k]) == 2) > len(both) // 2  # per epoch, not once per image
    for b in batches[:12]:
        for i, (k, f) in enumerate(zip(b.keys, b.caption_fields)):
            emb = stored(got[k], "text_emb" if f == "caption" else "text_emb_caption_short")
            assert torch.equal(b.text[i, : len(emb)], torch.from_numpy(emb.copy())) and not b.text[i, len(emb) :].any()
            assert int(b.mask[i].sum()) == len(emb)
    in_workers = list(make_loader(ds, 0, 5, 16, workers=2, epochs=2))
    assert [(b.keys, b.caption_fields) for b in in_workers] == [(b.keys, b.caption_fields) for b in batches[: len(in_workers)]]
    equal = StreamingFeatureDataset(world["features"], 16, FIELDS)
    drawn = Counter(f for b in make_loader(equal, 0, 5, 16, workers=0, epochs=30) for k, f in zip(b.keys, b.caption_fields)
                    if int(k[1:]) not in NO_SHORT)  # fmt: skip
    assert 0.45 < drawn["caption_short"] / sum(drawn.values()) < 0.55, drawn


def test_resume_with_several_fields_is_exact_and_the_trainer_sees_both(world, tmp_path):
    from safetensors.torch import load_file

    from t2i.train import train

    full = train(tiny_cfg(world, trace_keys=True), tmp_path / "full", features=world["features"], progress=False)
    part = train(tiny_cfg(world), tmp_path / "part", features=world["features"], stop_after=3, progress=False)
    resumed = train(tiny_cfg(world), tmp_path / "part", features=world["features"], resume=True, progress=False)
    assert part["step"] == 3 and resumed["start_step"] == 3 and resumed["step"] == full["step"] == 10
    a, b = ([json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()] for run in (tmp_path / "full", tmp_path / "part"))
    assert len(a) == 10 and a == b
    wa, wb = (load_file(Path(r["checkpoint"]) / "ema.safetensors") for r in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    seen = Counter(f for line in (tmp_path / "full" / "trace" / "rank-0.jsonl").read_text().splitlines()
                   for f in json.loads(line).get("caption_fields", []))  # fmt: skip
    assert seen["caption"] > seen["caption_short"] > 0
    caption_only = train(tiny_cfg(world, caption_fields="caption_short", caption_weights=()), tmp_path / "short",
                         features=_short_only_features(world, tmp_path), progress=False)
    assert caption_only["step"] == 10  # a single field other than caption trains too


def _short_only_features(world, tmp_path) -> str:
    from t2i.features import compute_features

    cfg = world["feature_cfg"]
    one = type(cfg)(**{**cfg.__dict__, "caption_fields": ("caption_short",)})
    r = compute_features(world["root"] / "captions", tmp_path / "short-features", one, progress=False)
    assert r["rows"] == N_ROWS - 1 - len(NO_SHORT) and r["skipped_invalid"] == 1 + len(NO_SHORT)
    assert "text_emb" not in pq.read_schema(complete_shards(r["dir"])[0]).names
    return r["dir"]


def _no_models(monkeypatch):
    from t2i import feature_encoder  # where the features job loads its models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(feature_encoder, "load_vae", refuse)
    monkeypatch.setattr(feature_encoder, "load_text_encoder", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--caption-fields", "caption,caption_long"], "error: caption field 'caption_long' is not a caption-shard text field: pick from caption, caption_dense"),
        (["--caption-fields", "caption,caption"], "names a field twice: name each field once"),
        (["--caption-fields", "caption,caption_short", "--caption-weights", "1,2,3"], "do not fit caption_fields caption, caption_short"),
        (["--caption-fields", "caption,caption_dense"], "error: caption field 'caption_dense' has no value in any caption shard"),
    ],
)
def test_bad_fields_are_one_line_errors_before_any_model_loads(world, tmp_path, monkeypatch, args, message):
    from typer.testing import CliRunner

    import cli

    _no_models(monkeypatch)
    common = ["--shards", str(world["root"] / "captions"), "--vae", world["vae"], "--text-encoder", world["text_encoder"],
              "--resolution", "16"]
    train = ["train", "--out", str(tmp_path / "run"), "--preset", "PixArt-tiny/2", *common, *args]
    features = ["features", "--out", str(tmp_path / "feats"), *common, *args[:2]]  # features has no weights
    for argv in (train, features) if "--caption-weights" not in args else (train,):
        r = CliRunner().invoke(cli.app, argv)
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    # nothing written: the outputs were only created, empty, by the check that comes first (shards.checks)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_manifest_and_features_dir_checks(world, tmp_path):
    from t2i.features import FeatureConfig
    from t2i.manifest import parse_manifest
    from t2i.train import train

    stage = parse_manifest('[[stages]]\nname = "a"\ncaption_fields = ["caption", "caption_short"]\ncaption_weights = [3, 1]\n').stages[0]
    assert stage.config.caption_fields == FIELDS and stage.config.caption_weights == (3.0, 1.0)
    key = stage.config.feature_config().cache_key()
    assert key == FeatureConfig(caption_fields=list(FIELDS)).cache_key() != FeatureConfig().cache_key()
    with pytest.raises(UserError, match=r"stage 'a': caption field 'tags' is not a caption-shard text field"):
        parse_manifest('[[stages]]\nname = "a"\ncaption_fields = ["caption", "tags"]\n')
    with pytest.raises(UserError, match="caption_fields = 3 should be a list"):
        parse_manifest('[[stages]]\nname = "a"\ncaption_fields = 3\n')
    # features made for two fields do not train a stage that asks for caption alone (nor the reverse)
    with pytest.raises(UserError, match=r"caption_fields \('caption', 'caption_short'\) \(this stage: \('caption',\)\)"):
        train(tiny_cfg(world, caption_fields="caption", caption_weights=()), tmp_path / "r", features=world["features"], progress=False)


def test_the_default_is_unchanged(world, tmp_path):
    """One `caption` field: the cache key main had before caption_fields existed, the same
    feature columns, and a features directory whose config predates the option still opens."""
    from t2i.features import FEATURE_SCHEMA, FeatureConfig, compute_features
    from t2i.train import find_features

    assert FeatureConfig().cache_key() == "53c6971941149495"  # the key of the defaults before this option
    cfg = tiny_cfg(world, caption_fields="caption", caption_weights=())
    assert cfg.caption_fields == ("caption",) and cfg.feature_config().cache_key() != world["feature_cfg"].cache_key()
    r = compute_features(world["root"] / "captions", tmp_path / "feats", cfg.feature_config(), progress=False)
    assert r["missing_fields"] == {} and r["rows"] == N_ROWS - 1
    assert pq.read_schema(complete_shards(r["dir"])[0]).names == FEATURE_SCHEMA.names
    config = Path(r["dir"]) / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "caption_fields"}))
    assert find_features(tmp_path / "feats", cfg) == Path(r["dir"]) == find_features(Path(r["dir"]), cfg)
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    b = next(iter(make_loader(StreamingFeatureDataset(r["dir"], 16), 0, 0, 8, workers=0)))
    assert b.caption_fields == ["caption"] * len(b.keys) and len(b.keys) > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_engine_encodes_the_fields_as_the_local_engine(world, tmp_path):
    ray = pytest.importorskip("ray")
    from t2i.features_ray import compute_features_ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        r = compute_features_ray(world["root"] / "captions", tmp_path, world["feature_cfg"], replicas=1, progress=False)
    finally:
        ray.shutdown()
    assert Path(r["dir"]).name == world["features"].name  # the same cache key: either engine resumes the other's run
    assert (r["rows"], r["skipped_invalid"], r["missing_fields"]) == (N_ROWS - 1, 1, {"caption_short": len(NO_SHORT)})
    local, remote = feature_rows(world["features"]), feature_rows(Path(r["dir"]))
    assert set(local) == set(remote)
    for key, a in local.items():
        b = remote[key]
        assert [b[c] for c in ("caption", "caption_short", "text_len", "text_len_caption_short")] == \
               [a[c] for c in ("caption", "caption_short", "text_len", "text_len_caption_short")]
        for emb in ("text_emb", "text_emb_caption_short"):
            if a[emb] is None:
                assert b[emb] is None
            else:
                np.testing.assert_allclose(stored(b, emb), stored(a, emb), rtol=1e-4, atol=1e-5)


def test_resume_with_other_caption_weights_or_fields_is_refused(world, tmp_path):
    """A checkpoint records its caption fields and weights; --resume with others is one line,
    exit 2, naming both (equal weights written two ways are the same setting)."""
    from typer.testing import CliRunner

    import cli
    from t2i.checkpoint import latest_checkpoint
    from t2i.train import train

    run = tmp_path / "run"
    train(tiny_cfg(world), run / "s", features=world["features"], stop_after=2, progress=False)
    st = json.loads((latest_checkpoint(run / "s") / "trainer_state.json").read_text())
    assert st["config"]["caption_fields"] == list(FIELDS) and st["config"]["caption_weights"] == [3.0, 1.0]
    (tmp_path / "m.toml").write_text('[defaults]\npreset = "PixArt-tiny/2"\nresolution = 16\nmax_tokens = 16\ntext_dtype = "float32"\n'
                                     'batch_size = 16\nseed = 3\nloader_workers = 0\ncaption_fields = ["caption", "caption_short"]\n'
                                     '[[stages]]\nname = "s"\nsteps = 3\n')
    common = ["train", "--manifest", str(tmp_path / "m.toml"), "--out", str(run), "--vae", world["vae"], "--text-encoder", world["text_encoder"]]
    short = ["--features", _short_only_features(world, tmp_path), "--caption-fields", "caption_short"]
    for change, old, new in ((["--features", str(world["features"]), "--caption-weights", "1,1"], "weights [3, 1]", "weights [1, 1]"),
                             (short, "fields [caption, caption_short]", "fields [caption_short] caption_weights [equal]")):
        r = CliRunner().invoke(cli.app, [*common, *change])
        assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert r.output.startswith("error: checkpoint ") and old in r.output and new in r.output, r.output
    resumed = train(tiny_cfg(world, caption_weights=[6, 2], steps=3), run / "s", features=world["features"], resume=True, progress=False)
    assert resumed["start_step"] == 2 and resumed["step"] == 3  # the same proportions, written otherwise, resume


def test_checkpoints_that_kept_the_caption_settings_at_the_top_level_are_still_checked():
    """Checkpoints written before the settings lived only in the state's config also kept them at
    its top level: a resume still reads them there."""
    from t2i.train import TrainConfig, check_caption_settings

    old_state = {"config": {"seed": 3}, "caption_fields": list(FIELDS), "caption_weights": [3.0, 1.0]}
    check_caption_settings(Path("ck"), old_state, TrainConfig(caption_fields=list(FIELDS), caption_weights=[3, 1]))
    with pytest.raises(UserError, match="trained with caption_fields \\[caption, caption_short\\] caption_weights \\[3, 1\\]"):
        check_caption_settings(Path("ck"), old_state, TrainConfig(caption_fields=list(FIELDS), caption_weights=[1, 1]))
    with pytest.raises(UserError, match="trained with caption_fields \\[caption\\] caption_weights \\[equal\\]"):
        check_caption_settings(Path("ck"), {"config": {"seed": 3}}, TrainConfig(caption_fields=list(FIELDS)))  # before the options
