"""The class-cond stage (t2i.class_cond): a tiny class-conditional DiT trained on demo-world images
with labels from a shard column, resumed, imported into PixArt through the real import-dit path
(exact at t = 500 against the DiT's unconditional output), and chained in a two-stage manifest."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)

N_IMAGES = 256


def write_labelled_shards(world_dir: Path, out_dir: Path, column: str = "shape", rows_per_shard: int = 100) -> None:
    """Caption shards of a write_sam_folder world (images by address, the dense caption) with
    one more column: each image's `column` from the world's ground truth."""
    from tiny.world import read_scenes
    from shards import CAPTION_SCHEMA, ShardWriter

    schema = CAPTION_SCHEMA.append(pa.field(column, pa.string()))
    w = ShardWriter(out_dir, rows_per_shard=rows_per_shard, schema=schema, writer_id="00000000")
    for rec, scene in read_scenes(world_dir):
        path = str((world_dir / rec["file_name"]).resolve())
        w.add({"key": rec["key"], "source": path, "address": path, "width": 32, "height": 32,
               "caption": rec["dense_caption"], "model": "truth", column: getattr(scene, column)})
    w.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.alignment import corpus
    from tiny.world import write_sam_folder
    from tiny.pixart import build_tiny_models

    root = tmp_path_factory.mktemp("class_cond")
    models = build_tiny_models(root / "models", corpus(300), vae_fit_steps=20)  # quality does not matter here
    write_sam_folder(root / "world", N_IMAGES, seed=0, image_size=32)
    write_labelled_shards(root / "world", root / "captions")
    return {"root": root, "captions": root / "captions", **models}


def dit_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(kind="class-cond", class_column="shape", preset="DiT-tiny/2", resolution=16, vae=world["vae"],
                text_encoder=world["text_encoder"], max_tokens=16, text_dtype="float32", batch_size=32, steps=8, lr=1e-3,
                warmup_steps=2, grad_clip=1.0, checkpoint_every=4, log_every=1, seed=3, loader_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dit_run(world):
    """One class-cond run of 8 steps, shared by the tests that only read it."""
    from t2i.stage import run_stage

    out = world["root"] / "dit"
    run_stage(dit_cfg(world), out, shards=world["captions"], features=world["root"] / "feats", progress=False)
    return out


def test_class_cond_checkpoint_is_a_diffusers_dit_with_its_classes(world, dit_run):
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file

    from t2i.checkpoint import latest_checkpoint

    ck = latest_checkpoint(dit_run)
    assert ck.name == "step-0000008"
    mapping = json.loads((ck / "classes.json").read_text())
    assert mapping == json.loads((dit_run / "classes.json").read_text())
    assert mapping == {"column": "shape", "classes": ["circle", "cross", "square", "triangle"], "null_class": 4}
    dit = DiTTransformer2DModel.from_pretrained(ck / "transformer")
    assert dit.config.num_embeds_ada_norm == 4 and dit.config.num_layers == 2 and dit.config.patch_size == 2
    ema = {k.removeprefix("transformer."): v for k, v in load_file(ck / "ema.safetensors").items()}
    for k, v in dit.state_dict().items():  # the EMA weights
        if k in ema:
            assert torch.equal(v, ema[k]), k
    for block in dit.transformer_blocks:  # the null class embeds to zero; the real classes have learned
        table = block.norm1.emb.class_embedder.embedding_table.weight
        assert table.shape[0] == 5 and table[4].abs().max() == 0 and table[:4].abs().max() > 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500)
    with torch.no_grad():
        by_class = [dit(x, timestep=t, class_labels=torch.full((2,), c)).sample for c in range(5)]
    assert all((by_class[c] - by_class[4]).abs().max() > 1e-4 for c in range(4))  # the class changes the output


def test_class_cond_resume_continues_exactly(world, dit_run, tmp_path):
    from t2i.stage import run_stage
    from t2i.train import train

    out = tmp_path / "resumed"
    kw = dict(shards=world["captions"], features=world["root"] / "feats", progress=False)
    run_stage(dit_cfg(world), out, stop_after=4, **kw)
    assert len(losses(out)) == 4
    r = train(dit_cfg(world), out, resume=True, features=kw["features"], progress=False)  # no shards: the stage's labels.parquet
    assert r["start_step"] == 4 and r["step"] == 8
    assert losses(out) == pytest.approx(losses(dit_run), rel=1e-5, abs=1e-7)


@torch.no_grad()
def test_import_dit_matches_the_dit_unconditional_output_at_t500(world, dit_run, tmp_path):
    """import-dit of the stage directory (its newest checkpoint) through the CLI: at t = 500 the
    PixArt model computes the DiT's null-class output (its cross-attention starts at zero)."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
    from typer.testing import CliRunner

    import cli
    from t2i.checkpoint import latest_checkpoint

    r = CliRunner().invoke(cli.app, ["import-dit", str(dit_run), "--out", str(tmp_path / "pixart"), "--caption-channels", "32"])
    assert r.exit_code == 0, r.output
    assert "depth 2, hidden 64, 4 heads" in r.output and "class_embedder" in r.output
    pixart = PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart")
    dit = DiTTransformer2DModel.from_pretrained(latest_checkpoint(dit_run) / "transformer")
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 500)
    ref = dit(x, timestep=t, class_labels=torch.full((3,), 4)).sample
    captions = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    out = pixart(x, encoder_hidden_states=captions, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                 return_dict=False)[0]
    assert ref.abs().mean() > 0.01  # a trained output, not two near-zero tensors
    assert (out - ref).abs().max() < 1e-4, (out - ref).abs().max()
    t100 = torch.full((3,), 100)  # away from t = 500 the adaLN tables no longer absorb the shared MLP
    ref100 = dit(x, timestep=t100, class_labels=torch.full((3,), 4)).sample
    out100 = pixart(x, encoder_hidden_states=captions, timestep=t100, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
    assert (out100 - ref100).abs().max() > 1e-4


def test_manifest_class_cond_then_text_to_image_from_previous(world, tmp_path):
    """Stage 1 trains the DiT, stage 2 (init = "previous") starts from its import: with lr 0
    stage 2's weights stay exactly what import-dit makes of stage 1's checkpoint."""
    from t2i.checkpoint import latest_checkpoint, load_weights
    from t2i.import_dit import import_dit
    from t2i.manifest import parse_manifest, run_manifest

    toml = '''
name = "two-stage"
[defaults]
resolution = 16
max_tokens = 16
text_dtype = "float32"
batch_size = 32
warmup_steps = 2
grad_clip = 1.0
log_every = 1
loader_workers = 0
checkpoint_every = 4
[[stages]]
name = "dit"
kind = "class-cond"
class_column = "shape"
preset = "DiT-tiny/2"
lr = 1e-3
steps = 4
[[stages]]
name = "align"
init = "previous"
lr = 0.0
steps = 2
'''
    manifest = parse_manifest(toml)
    over = {"vae": world["vae"], "text_encoder": world["text_encoder"]}
    res = run_manifest(manifest, tmp_path / "runs", world["captions"], overrides=over, progress=False)
    assert [r["stage"] for r in res] == ["dit", "align"] and res[1]["step"] == 2
    imported, _ = import_dit(tmp_path / "runs" / "dit", caption_channels=32, latent_size=8)
    trained = load_weights(latest_checkpoint(tmp_path / "runs" / "align"), "model")
    for k, v in imported.state_dict().items():
        assert torch.equal(trained[f"transformer.{k}"], v), k
    again = run_manifest(manifest, tmp_path / "runs", world["captions"], overrides=over, progress=False)
    assert [r.get("skipped") for r in again] == ["finished", "finished"]


def test_flow_chain_class_cond_then_text_to_image_and_ddpm_dit_into_flow_refused(world, dit_run, tmp_path):
    """The clean path to a flow text-to-image stage from a DiT: the class-cond stage trains with
    objective = "flow" too (its checkpoints record it, its samples come from the flow sampler) and
    the next stage imports it; a DDPM DiT into a flow stage is refused in one line."""
    from t2i.class_cond import generate_classes
    from t2i.manifest import parse_manifest, run_manifest
    from t2i.stage import run_stage
    from t2i.train import TrainConfig

    toml = """
[defaults]
objective = "flow"
timestep_density = "logit_normal"
resolution = 16
max_tokens = 16
text_dtype = "float32"
batch_size = 32
lr = 1e-3
warmup_steps = 2
log_every = 1
loader_workers = 0
checkpoint_every = 2
[[stages]]
name = "dit"
kind = "class-cond"
class_column = "shape"
preset = "DiT-tiny/2"
steps = 2
[[stages]]
name = "align"
init = "previous"
steps = 2
"""
    over = {"vae": world["vae"], "text_encoder": world["text_encoder"]}
    res = run_manifest(parse_manifest(toml), tmp_path / "runs", world["captions"], overrides=over, progress=False)
    assert [r["step"] for r in res] == [2, 2]
    assert json.loads((tmp_path / "runs" / "dit" / "log.jsonl").read_text().splitlines()[0]).keys() >= {"loss", "mse"}
    images = generate_classes(tmp_path / "runs" / "dit", ["circle"], steps=3, device="cpu")
    assert images[0].size == (16, 16)
    cfg = TrainConfig(**{**dit_cfg(world).__dict__, "kind": "text-to-image", "preset": "PixArt-tiny/2", "class_column": "",
                         "objective": "flow", "init": f"dit:{dit_run}", "steps": 1})
    with pytest.raises(UserError, match="was trained with objective 'ddpm', this stage trains 'flow'"):
        run_stage(cfg, tmp_path / "refused", shards=world["captions"], features=world["root"] / "feats", progress=False)


def test_class_cond_stage_continues_a_class_cond_stage(world, dit_run, tmp_path):
    """init = "checkpoint:<class-cond stage>" (what "previous" becomes between two class-cond
    stages) starts from its training weights; with lr 0 they stay exactly those."""
    from t2i.checkpoint import latest_checkpoint, load_weights
    from t2i.stage import run_stage

    run_stage(dit_cfg(world, init=f"checkpoint:{dit_run}", lr=0.0, steps=2), tmp_path / "next", shards=world["captions"],
              features=world["root"] / "feats", progress=False)
    before = load_weights(latest_checkpoint(dit_run), "model")
    after = load_weights(latest_checkpoint(tmp_path / "next"), "model")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_class_cond_and_bad_input_is_one_line(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    common = ["train", "--kind", "class-cond", "--shards", str(world["captions"]), "--preset", "DiT-tiny/2", "--resolution", "16",
              "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--steps", "2", "--batch-size", "32",
              "--loader-workers", "0"]
    r = CliRunner().invoke(cli.app, [*common, "--class-column", "colour", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: class_column 'colour' is not a column of"), line
    assert not (tmp_path / "bad" / "features").exists()  # checked before any work
    assert "caption" in line and "key" in line and "set class_column to one of them" in line
    r = CliRunner().invoke(cli.app, [*common, "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "needs class_column" in r.output, r.output
    r = CliRunner().invoke(cli.app, [*common, "--class-column", "shape", "--out", str(tmp_path / "ok"),
                                     "--report-to", "tensorboard", "--sample-prompts", "circle|cross"])
    assert r.exit_code == 0, r.output
    assert "trained to step 2" in r.output
    assert (tmp_path / "ok" / "samples" / "step-0000002.png").exists()  # the trackers' grid: classes as prompts
    r = CliRunner().invoke(cli.app, ["sample", str(tmp_path / "ok"), "--prompt", "a circle"])  # prompts name classes
    assert r.exit_code == 2 and "'a circle' is not a class of" in r.output and "circle, cross, square, triangle" in r.output, r.output
    png = tmp_path / "grid.png"
    r = CliRunner().invoke(cli.app, ["sample", str(tmp_path / "ok"), "--prompt", "circle", "--prompt", "cross", "--steps", "3", "--out", str(png)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(png).size == (32, 16)
    r = CliRunner().invoke(cli.app, ["export", str(tmp_path / "ok"), "--out", str(tmp_path / "pipe")])
    assert r.exit_code == 2 and "class-conditional DiT" in r.output, r.output


def test_example_manifest_parses():
    from t2i.manifest import load_manifest

    m = load_manifest("tiny-dit-cpu")
    assert [(s.config.kind, s.config.init) for s in m.stages] == [("class-cond", "scratch"), ("text-to-image", "previous")]
    assert m.stages[0].config.class_column == "shape"


def test_flops_of_a_class_cond_stage_leave_out_cross_attention():
    from shards.gpus import GPUS
    from costs.plan import PlanOptions, train_row
    from t2i.manifest import parse_manifest
    from t2i.models import PRESETS, flops_per_image

    full = flops_per_image("PixArt-XL/2", (32, 32), 120, 4096)
    dit = flops_per_image("DiT-XL/2", (32, 32), 120, 4096, cross_attention=False)
    h, t, depth = PRESETS["PixArt-XL/2"].hidden, 256, PRESETS["PixArt-XL/2"].depth
    # a DiT block: qkv/out (4 h^2), MLP (8 h^2) per token and the attention itself; no caption projection
    assert dit == 3 * 2 * (depth * (t * 12 * h * h + 2 * t * t * h) + t * 16 * h * 3)
    assert dit < full
    stages = parse_manifest('''
[[stages]]
name = "dit"
kind = "class-cond"
class_column = "label"
preset = "DiT-XL/2"
steps = 10
batch_size = 8
gpus = 1
[[stages]]
name = "t2i"
preset = "PixArt-XL/2"
steps = 10
batch_size = 8
gpus = 1
''').stages
    rows = [train_row(s, GPUS["H100"], PlanOptions(), "test") for s in stages]
    assert rows[0].flops == pytest.approx(80 * dit) and rows[1].flops == pytest.approx(80 * full)


def test_labels_step_lookup_and_errors(tmp_path):
    from types import SimpleNamespace

    from shards import CAPTION_SCHEMA, ShardWriter
    from t2i.class_cond import label_classes, load_labels, write_labels

    schema = CAPTION_SCHEMA.append(pa.field("kind", pa.int64()))
    w = ShardWriter(tmp_path / "c", rows_per_shard=3, schema=schema, writer_id="00000000")
    for i, label in enumerate([7, 3, None, 7, 3]):
        w.add({"key": f"k{i}", "caption": "x", "kind": label})
    w.close()
    out = tmp_path / "stage"
    out.mkdir()
    assert write_labels(SimpleNamespace(class_column="kind"), tmp_path / "c", out) == 5
    assert json.loads((out / "classes.json").read_text()) == {"column": "kind", "classes": [3, 7], "null_class": 2}
    labels = load_labels(out, "kind")
    assert labels.lookup(["k0", "k1", "k2", "k4"]).tolist() == [1, 0, 2, 0]  # null label: the null class (2)
    with pytest.raises(UserError, match="no row in the caption shards"):
        labels.lookup(["nope"])
    with pytest.raises(UserError, match="come from column 'kind', not 'other'"):
        load_labels(out, "other")
    with pytest.raises(UserError, match="no labels in"):
        load_labels(tmp_path, "kind")
    with pytest.raises(UserError, match="not one of the classes"):
        label_classes(tmp_path / "c", "kind", classes=[3])
    with pytest.raises(UserError, match="is empty"):
        label_classes(tmp_path / "c", "alt_text")
    # a resumed stage keeps its class ids even when the shards would sort them otherwise
    (out / "classes.json").write_text(json.dumps({"column": "kind", "classes": [7, 3], "null_class": 2}))
    write_labels(SimpleNamespace(class_column="kind"), tmp_path / "c", out, resume=True)
    assert load_labels(out, "kind").lookup(["k0", "k1"]).tolist() == [0, 1]
