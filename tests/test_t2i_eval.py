"""`t2i-data eval` on the demo world: a tiny CLIP the project trains on world scenes scores the
samples of a tiny PixArt; a briefly trained checkpoint must beat an untrained one on CLIPScore.
FID runs through torchmetrics with an Inception v3 weights file this test writes itself (a
randomly initialised network of torch-fidelity's architecture: the real loading path, not the
real weights, which cannot be downloaded here)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tiny import world as W

PROMPT_SEED = 7


def _train_tiny_clip(out: Path) -> Path:
    """A tiny CLIP at the generated images' size (16 px), fitted on rendered world scenes."""
    from tiny.alignment import corpus
    from tiny.clip import build_tiny_clip, fit_on_world, save_clip

    scenes = W.sample_scenes(400, seed=0)
    texts = [W.dense_caption(s) for s in scenes]
    model, tokenizer, processor = build_tiny_clip(texts + corpus(), image_size=16, patch=4)
    fit_on_world(model, tokenizer, processor, [W.render(s, 16) for s in scenes], texts, steps=150)
    return save_clip(model, tokenizer, processor, out)


@pytest.fixture(scope="module")
def world(tmp_path_factory, world_models):
    """A run directory with an untrained checkpoint (step 1) and a trained one (800 steps), the
    tiny CLIP, and a folder of reference world images."""
    from t2i.stage import run_stage
    from t2i.train import TrainConfig
    from tiny.alignment import write_world_shards

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    clip = _train_tiny_clip(root / "clip")
    models = world_models
    write_world_shards(root / "captions", 512)
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae=models["vae"], text_encoder=models["text_encoder"],
                      max_tokens=40, text_dtype="float32", batch_size=32, steps=1, lr=1e-3, warmup_steps=20,
                      grad_clip=1.0, checkpoint_every=1000, log_every=100, loader_workers=0)  # fmt: skip
    run_stage(cfg, root / "run", shards=root / "captions", progress=False)
    run_stage(dataclasses.replace(cfg, steps=800), root / "run", shards=root / "captions", resume=True, progress=False)
    reference = root / "reference"
    reference.mkdir()
    for i, scene in enumerate(W.sample_scenes(32, seed=3)):
        W.render(scene, 16).save(reference / f"ref-{i:03d}.png")
    return dict(root=root, clip=str(clip), run=root / "run", reference=reference)


def prompts(n: int = 48) -> list[str]:
    return [W.dense_caption(s) for s in W.sample_scenes(n, seed=PROMPT_SEED)]


@pytest.mark.slow
def test_eval_ranks_trained_above_untrained_and_writes_json_and_html(world, tmp_path):
    from t2i.evaluate import evaluate_checkpoints

    out = tmp_path / "eval"
    report = evaluate_checkpoints(world["run"], prompts=prompts(), out=out, clip=world["clip"], reference=world["reference"],
                                  fid_features="clip", progress=False)  # fmt: skip
    rows = {r["name"]: r for r in report["checkpoints"]}
    assert list(rows) == ["step-0000001", "step-0000800"], "one row per checkpoint, oldest first"
    untrained, trained = rows["step-0000001"], rows["step-0000800"]
    assert trained["step"] == 800 and untrained["step"] == 1 and trained["samples"] == 48
    assert trained["clip_score"] > untrained["clip_score"], rows
    assert math.isfinite(trained["fid"]) and trained["fid"] < untrained["fid"], "closer to the world's images once trained"
    assert trained["aesthetic"] is None, "no --aesthetic head given"

    saved = json.loads((out / "eval.json").read_text())
    assert [r["clip_score"] for r in saved["checkpoints"]] == [untrained["clip_score"], trained["clip_score"]]
    assert saved["reference"]["images"] == 32 and saved["reference"]["features"] == "clip"
    page = (out / "eval.html").read_text()
    assert page.count("<tr>") == 3 and "step-0000800/grid.png" in page and "step-0000001/grid.png" in page
    assert (out / "step-0000800" / "grid.png").is_file() and len(list((out / "step-0000800").glob("sample-*.png"))) == 48
    lines = (out / "step-0000800" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(l)["prompt"] for l in lines] == prompts()


@pytest.mark.slow
def test_cli_eval_one_checkpoint_with_aesthetic_resumes(world, tmp_path):
    """The CLI on a single checkpoint directory with an aesthetic head; a rerun reuses the result."""
    import cli
    from shards.models.aesthetic import AestheticMLP, save_head
    from shards.models.clip import ClipEmbedder

    head = tmp_path / "head.safetensors"
    save_head(AestheticMLP(ClipEmbedder(world["clip"]).dim), head)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts(6)) + "\n\n")
    ck = world["run"] / "checkpoints" / "step-0000800"
    args = ["eval", str(ck), "--prompts", str(tmp_path / "prompts.txt"), "--clip", world["clip"], "--aesthetic", str(head),
            "--steps", "5", "--out", str(tmp_path / "e"), "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert "step-0000800: CLIPScore" in r.output and "aesthetic" in r.output
    result = json.loads((tmp_path / "e" / "eval.json").read_text())["checkpoints"]
    assert len(result) == 1 and result[0]["samples"] == 6 and math.isfinite(result[0]["aesthetic"])
    grid = tmp_path / "e" / "step-0000800" / "grid.png"
    before = grid.stat().st_mtime_ns
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0 and grid.stat().st_mtime_ns == before, "the finished checkpoint was not sampled again"
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["checkpoints"] == result


@pytest.mark.slow
def test_eval_an_exported_pipeline_scores_as_its_checkpoint(world, tmp_path):
    """An `export` folder is sampled through diffusers' pipeline + the saved null caption: the same
    images, so the same scores, as the checkpoint it came from."""
    from t2i.evaluate import evaluate_checkpoints
    from t2i.export import export

    ck = world["run"] / "checkpoints" / "step-0000800"
    pipe = export(ck, tmp_path / "pipe")
    common = dict(prompts=prompts(4), clip=world["clip"], steps=3, progress=False)
    from_export = evaluate_checkpoints(pipe, out=tmp_path / "a", **common)["checkpoints"]
    from_checkpoint = evaluate_checkpoints(ck, out=tmp_path / "b", **common)["checkpoints"]
    assert [r["kind"] for r in from_export] == ["export"] and from_export[0]["name"] == "pipe"
    assert from_export[0]["clip_score"] == pytest.approx(from_checkpoint[0]["clip_score"], abs=1e-4)


@pytest.mark.slow
def test_cli_eval_bad_inputs_are_one_line_errors(world, tmp_path):
    import cli

    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    ck = str(world["run"] / "checkpoints" / "step-0000001")
    base = ["eval", ck, "--prompts", str(tmp_path / "p.txt"), "--clip", world["clip"], "--out", str(tmp_path / "e"), "--no-progress"]
    cases = {
        "--inception": base + ["--reference", str(world["reference"]), "--inception", str(tmp_path / "nope.pth")],
        "--inception (not given)": base + ["--reference", str(world["reference"])],
        "--reference": base + ["--reference", str(tmp_path / "no-such-folder"), "--fid-features", "clip"],
        "prompts file": ["eval", ck, "--prompts", str(tmp_path / "missing.txt")],
        "nothing to evaluate": ["eval", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--clip", world["clip"]],
        "--fid-features": base + ["--reference", str(world["reference"]), "--fid-features", "dino"],
    }
    for needle, args in cases.items():
        r = CliRunner().invoke(cli.app, args)
        assert r.exit_code == 2, (needle, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (needle, r.output)


def _random_inception_weights(path: Path) -> Path:
    """torch-fidelity's Inception v3, randomly initialised (He-normal convolutions, so features
    neither vanish nor explode), saved as a state dict: a stand-in for the real weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def test_fid_with_inception_weights_from_a_file(tmp_path):
    from t2i.fid import FidMeter

    torch.set_num_threads(1)
    weights = _random_inception_weights(tmp_path / "inception.pth")
    ref = [W.render(s, 32) for s in W.sample_scenes(8, seed=3)]
    other = [W.render(dataclasses.replace(s, quality="low"), 32) for s in W.sample_scenes(8, seed=4)]
    fid = FidMeter("inception", weights, dims=64)
    fid.add(ref, real=True)
    fid.add(ref, real=False)
    same = fid.compute()
    fid.add(other, real=False)
    different = fid.compute()
    assert math.isfinite(same) and math.isfinite(different)
    assert abs(same) < 1e-3 * different and different > 0, (same, different)
    with pytest.raises(Exception, match="--inception .* is not torch-fidelity's Inception v3 weights"):
        torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
        FidMeter("inception", tmp_path / "wrong.pth", dims=64)


@pytest.mark.slow  # about 35 s of Inception features on CPU
def test_kid_beside_fid_near_zero_for_the_reference_itself(tmp_path):
    """KID (torchmetrics) from the same features as FID: KID(ref, ref) is near 0 (the unbiased
    estimate of one set against itself sits a little below 0: -2 (mean k(x, x) - mean k(x, y)) / m),
    as is KID against another draw of the same world, and both are far below KID(ref, other); a
    second compute gives the same number (subsets drawn from a fixed seed)."""
    from t2i.fid import FidMeter

    torch.set_num_threads(1)
    weights = _random_inception_weights(tmp_path / "inception.pth")
    ref = [W.render(s, 32) for s in W.sample_scenes(24, seed=3)]
    again = [W.render(s, 32) for s in W.sample_scenes(24, seed=5)]
    other = [W.render(dataclasses.replace(s, quality="low"), 32) for s in W.sample_scenes(24, seed=4)]
    meter = FidMeter("inception", weights, dims=2048)
    meter.add(ref, real=True)
    kids = {}
    for name, images in (("same", ref), ("again", again), ("other", other)):
        meter.add(images, real=False)
        assert meter.compute_kid() == meter.compute_kid(), "reproducible"
        meter.compute()
        kids[name] = meter.kid[0]
        assert math.isfinite(meter.kid[1])
    assert kids["other"] > 0 and abs(kids["same"]) < 0.25 * kids["other"], kids
    assert kids["same"] < kids["other"] and kids["again"] < kids["other"], kids
    assert meter.generated_count == 0 and meter.reference_count == 24
