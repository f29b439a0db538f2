"""REPA (issue 29, item 2) on the tiny world: the teacher (any ViT-family transformers vision model;
the demo's shipped one), its patch tokens stored by `features` beside the latents and streamed by
the loader, the REPA loss term (lambda 0 is the plain run, the teacher gets no gradients, token
routing compares the kept tokens, gradient checkpointing changes nothing), exact resume, export
without the projector, both conditionings, `plan`'s prices, and every bad setting a one-line
error with exit 2 within 15 s."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.errors import UserError
from demo.teacher import SHIPPED_TEACHER
from test_t2i_levers import log, stage, tiny_cfg, world  # noqa: F401 - world is a fixture (the levers' tiny world, 16 px)

TEACHER = str(SHIPPED_TEACHER)  # the demo's teacher: 8x8 patches of a 32 px input, so 16 px images give 8x8 (resized to 4x4)

torch.set_num_threads(1)


def repa(world, **kw) -> dict:
    return {"teacher": TEACHER, "repa_weight": 0.5, **kw}


def tiny_vision_models(root: Path) -> dict[str, str]:
    """Tiny random transformers models of each family, saved with their processors."""
    from transformers import (BertConfig, BertModel, BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ResNetConfig, ResNetModel, SiglipConfig,
                              SiglipImageProcessor, SiglipModel)

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    models = {
        "dinov2_registers": (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                                               patch_size=4, image_size=32, num_register_tokens=4)),
                             BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "clip": (CLIPModel(CLIPConfig(text_config=small, vision_config={**small, "patch_size": 8, "image_size": 32}, projection_dim=16)),
                 CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip": (SiglipModel(SiglipConfig(text_config=small, vision_config={**small, "patch_size": 8, "image_size": 32})),
                   SiglipImageProcessor(size={"height": 32, "width": 32})),
        "resnet": (ResNetModel(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)), None),
        "bert": (BertModel(BertConfig(**small)), None),
    }
    for name, (model, processor) in models.items():
        model.save_pretrained(root / name)
        if processor is not None:
            processor.save_pretrained(root / name)
    return {name: str(root / name) for name in models}


# ---- the teacher --------------------------------------------------------------------------------

def test_shipped_teacher_loads_through_the_generic_path_and_gives_the_8x8_grid():
    from demo.run import DemoConfig, _arm_settings
    from t2i.teacher import Teacher

    teacher = Teacher.load(str(SHIPPED_TEACHER))
    assert type(teacher.model).__name__ == "Dinov2Model" and teacher.prefix == 1
    assert all(not p.requires_grad for p in teacher.model.parameters())
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    tokens, grid = teacher.encode(pixels)
    assert grid == (8, 8) and tokens.shape == (3, 64, 64) and not tokens.requires_grad  # the demo's 8x8 token grid
    fit = json.loads((SHIPPED_TEACHER / "fit.json").read_text())
    assert fit["grid"] == [8, 8] and fit["held_out"]["shape_vs_background"] > 0.9
    assert fit["held_out"]["kind_of_found_shapes"] >= 0.8  # it knows shape kinds (chance 0.25): REPA has them to pass on
    assert sum(f.stat().st_size for f in SHIPPED_TEACHER.iterdir()) < 1 << 20  # small enough to ship
    for cfg in (DemoConfig(), DemoConfig.full("x")):  # the demo's own arms do not use it (the ablation's REPA arm does)
        base = _arm_settings(cfg, Path("t5"), progress=False).base
        assert base.teacher == "" and base.repa_weight == 0


def test_the_demo_teacher_fit_is_deterministic():
    """`python -m demo.teacher` makes the same weights on every run (seeded data, init and order;
    one thread): a few steps twice give identical tensors."""
    from demo.teacher import fit_teacher

    torch.set_num_threads(1)
    (a, head_a, log_a), (b, head_b, log_b) = fit_teacher(steps=3, batch=4), fit_teacher(steps=3, batch=4)
    assert log_a == log_b
    for (name, x), (_, y) in zip([*a.state_dict().items(), *head_a.state_dict().items()],
                                 [*b.state_dict().items(), *head_b.state_dict().items()]):
        assert torch.equal(x, y), name


def test_teachers_of_each_family_and_models_without_patch_tokens(tmp_path):
    from t2i.teacher import Teacher

    paths = tiny_vision_models(tmp_path)
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1  # a 2:3 bucket: the same pixel area at its aspect
    for name, prefix, grid in (("dinov2_registers", 5, (7, 10)), ("clip", 1, (3, 5)), ("siglip", 0, (3, 5))):
        teacher = Teacher.load(paths[name])
        tokens, got = teacher.encode(pixels)
        assert (teacher.prefix, got, tokens.shape) == (prefix, grid, (2, grid[0] * grid[1], 32)), name
        assert type(teacher.model).__name__.endswith(("VisionModel", "RegistersModel")), name  # a CLIP's vision tower
    for name in ("resnet", "bert"):
        with pytest.raises(UserError, match=r"has no patch tokens .*use a ViT-family vision model"):
            Teacher.load(paths[name])


def test_grids_interpolate_bilinearly_or_are_refused():
    from t2i.repa import check_grid, match_grid

    t = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    assert match_grid(t, (4, 4), (4, 4)) is t
    half = match_grid(t, (4, 4), (2, 2))
    want = torch.nn.functional.interpolate(t.transpose(1, 2).reshape(2, 3, 4, 4), size=(2, 2), mode="bilinear")
    torch.testing.assert_close(half, want.flatten(2).transpose(1, 2))
    check_grid((13, 20), (16, 24))  # rounding to whole patches: within the tolerance
    with pytest.raises(UserError, match="another aspect than the model's token grid 16x24"):
        check_grid((16, 16), (16, 24))


# ---- features and the loader --------------------------------------------------------------------

def test_teacher_features_in_the_shards_equal_a_direct_forward_pass(world):
    import io

    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import Dinov2Model

    from shards import complete_shards
    from t2i.data import StreamingFeatureDataset
    from t2i.features import FeatureConfig, compute_features
    from t2i.geometry import image_to_tensor
    from t2i.loader import make_loader

    cfg = tiny_cfg(world, **repa(world)).feature_config()
    assert cfg.cache_key() != tiny_cfg(world).feature_config().cache_key()  # never mixed with features made without
    assert FeatureConfig().cache_key() == "53c6971941149495"  # features made before the option keep their key
    r = compute_features(world["captions"], world["feats"], cfg, progress=False)
    table = pq.read_table(complete_shards(r["dir"])[0])
    assert table.column("teacher_dtype")[0].as_py() == "float16" and table.column("teacher_shape")[0].as_py() == [8, 8, 64]
    assert len(table.column("teacher_emb")[0].as_py()) == 8 * 8 * 64 * 2  # bytes per sample
    captions = pq.read_table(complete_shards(world["captions"])[0]).to_pylist()[:4]
    pixels = torch.stack([image_to_tensor(Image.open(io.BytesIO(c["image"])).convert("RGB"), 16, 16) for c in captions])
    x = torch.nn.functional.interpolate((pixels + 1) / 2, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        direct = Dinov2Model.from_pretrained(TEACHER).eval()(pixel_values=(x - 0.5) / 0.5).last_hidden_state[:, 1:]
    stored = {row["key"]: np.frombuffer(row["teacher_emb"], np.float16).reshape(64, 64) for row in table.to_pylist()}
    for c, want in zip(captions, direct):
        np.testing.assert_allclose(stored[c["key"]].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
    ds = StreamingFeatureDataset(r["dir"], 16, teacher=True)
    b = ds.get(np.arange(5))
    assert b.teacher.dtype == torch.float16 and b.teacher.shape == (5, 64, 64) and b.teacher_grid == (8, 8)
    for i, key in enumerate(b.keys):
        assert np.array_equal(b.teacher[i].numpy(), stored[key])
    ring = next(iter(make_loader(ds, 0, 0, 8, workers=0)))  # the loader's ring slots carry them too
    assert all(np.array_equal(ring.teacher[i].numpy(), stored[k]) for i, k in enumerate(ring.keys))
    assert StreamingFeatureDataset(r["dir"], 16).get(np.arange(2)).teacher is None  # read only when asked


# ---- the loss term ------------------------------------------------------------------------------

def _tiny_model(depth: int = 3):
    from t2i.models import PixArtWithNull, Preset, build_transformer

    torch.manual_seed(0)
    model = PixArtWithNull(build_transformer(Preset(depth=depth, hidden=32, heads=2, patch=2), 8, 16), 4)
    for p in model.parameters():  # the zero-initialised layers would hide any difference
        torch.nn.init.normal_(p, std=0.05)
    return model


def _call(model, g=None):
    g = g or torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kw = dict(captions=torch.randn(2, 4, 16, generator=g), caption_mask=torch.ones(2, 4, dtype=torch.long))
    target = torch.randn(2, 64, 8, generator=g)  # an 8x8 teacher grid on a 4x4 token grid
    return x, kw, {"x0": x, "repa": {"target": target, "grid": (8, 8)}}


def test_repa_aligns_the_chosen_block_and_the_teacher_gets_no_gradients():
    from t2i.repa import Repa, match_grid

    model = _tiny_model()
    term = Repa(0.5, block=2, proj=16, teacher_dim=8)
    term.attach(model)
    seen = {}
    model.transformer.transformer_blocks[1].register_forward_hook(lambda m, a, out: seen.update(h=out))
    x, kw, inp = _call(model)
    inp["repa"]["target"].requires_grad_(True)  # were the stored features a leaf of this graph, they would get a gradient
    model(x, torch.tensor([10, 900]), **kw)
    value = term(inp)
    want = 1 - torch.nn.functional.cosine_similarity(model.repa_projector(seen["h"]), match_grid(inp["repa"]["target"], (8, 8), (4, 4)), dim=-1).mean(1)
    torch.testing.assert_close(value, want)
    value.sum().backward()
    assert inp["repa"]["target"].grad is None  # the teacher's tokens are compared as stored: no gradient reaches them
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["repa_projector.0.weight"].abs().sum() > 0 and grads["transformer.transformer_blocks.1.attn1.to_q.weight"].abs().sum() > 0
    assert grads["transformer.transformer_blocks.2.attn1.to_q.weight"] is None  # after the aligned block: nothing from REPA
    model.eval()
    with torch.no_grad():
        model(x, torch.tensor([10, 900]), **kw)  # validation and sampling forwards do not project
    with pytest.raises(RuntimeError, match="needs a training forward"):
        term(inp)


def test_repa_with_routing_compares_the_kept_tokens_and_checkpointing_changes_nothing():
    from t2i.repa import Repa, match_grid
    from t2i.routing import attach_routing, routing

    keep = torch.tensor([[0, 3, 5, 6, 9, 10, 12, 15], [1, 2, 4, 7, 8, 11, 13, 14]])
    for block, kept in ((1, True), (3, False)):  # inside the routed blocks [0, 2), and after them
        model = _tiny_model()
        attach_routing(model, 0.5, 0, 2)
        term = Repa(0.5, block=block, proj=16, teacher_dim=8)
        term.attach(model)
        seen = {}
        model.transformer.transformer_blocks[block - 1].register_forward_hook(lambda m, a, out: seen.update(h=out))
        x, kw, inp = _call(model)
        inp["keep"] = keep
        values, grads = [], []
        for ckpt in (False, True):
            (model.transformer.enable_gradient_checkpointing if ckpt else model.transformer.disable_gradient_checkpointing)()
            model.zero_grad(set_to_none=True)
            with routing(model, keep):
                model(x, torch.tensor([10, 900]), **kw)
            values.append(term(inp))
            values[-1].sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        target = match_grid(inp["repa"]["target"], (8, 8), (4, 4))
        if kept:
            assert seen["h"].shape[1] == 8
            target = target.gather(1, keep[:, :, None].expand(-1, -1, 8))
        else:
            assert seen["h"].shape[1] == 16
        want = 1 - torch.nn.functional.cosine_similarity(model.repa_projector(seen["h"]), target, dim=-1).mean(1)
        torch.testing.assert_close(values[0], want.detach())
        torch.testing.assert_close(values[1], values[0])
        assert grads[0].keys() == grads[1].keys() and "repa_projector.4.weight" in grads[0]
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# ---- training -----------------------------------------------------------------------------------

def test_repa_weight_zero_is_the_plain_run_and_repa_resumes_exactly(world, tmp_path):
    from safetensors import safe_open

    from t2i.train import train

    plain = stage(world, tmp_path / "plain")
    zero = stage(world, tmp_path / "zero", teacher=TEACHER, repa_weight=0.0)
    assert zero["features"] != plain["features"]  # the features made with the teacher, same latents
    assert [x["loss"] for x in log(tmp_path / "zero")] == [x["loss"] for x in log(tmp_path / "plain")]
    full = stage(world, tmp_path / "full", **repa(world))
    stage(world, tmp_path / "part", stop_after=3, **repa(world))
    train(tiny_cfg(world, **repa(world)), tmp_path / "part", features=world["feats"], resume=True, progress=False)
    a, b = log(tmp_path / "full"), log(tmp_path / "part")
    assert [(x["loss"], x["repa"]) for x in a] == [(x["loss"], x["repa"]) for x in b] and len(a) == 6
    assert all(0 < x["repa"] < 2 for x in a) and a[-1]["repa"] < a[0]["repa"]  # 1 - cos, learning to align
    assert [x["mse"] for x in a] != [x["mse"] for x in log(tmp_path / "plain")]  # it changes the training
    with safe_open(str(Path(full["checkpoint"]) / "model.safetensors"), "pt") as f:
        trained = set(f.keys())
        assert {k for k in trained if k.startswith("repa_projector.")} == {f"repa_projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    with safe_open(str(Path(full["checkpoint"]) / "optimizer.safetensors"), "pt") as f:
        states = {k.split(".")[1] for k in f.keys() if k.startswith("state.")}
    # the teacher is never loaded in training: none of its weights is in the model or the optimizer,
    # whose AdamW states are exactly one per trained tensor (the model's and the projector's)
    assert not [k for k in trained if k.startswith(("embeddings.", "encoder.", "layernorm"))] and len(states) == len(trained)
    for kw, message in [({"repa_weight": 0.25}, "repa_weight 0.5 (this run: 0.25)"), ({"repa_block": 2}, "repa_block 0 (this run: 2)")]:
        with pytest.raises(UserError, match=r"other REPA settings: " + message.replace("(", r"\(").replace(")", r"\)")):
            train(tiny_cfg(world, steps=8, **repa(world, **kw)), tmp_path / "part", features=world["feats"], resume=True, progress=False)


def test_export_drops_the_projector_and_draws_our_samples(world, tmp_path):
    from safetensors import safe_open

    from t2i.export import export, load_exported
    from t2i.pipeline import generate, pipeline_from_checkpoint

    run = stage(world, tmp_path / "r", steps=3, **repa(world))
    prompts = ["a red circle on the left", "a blue square on the right"]
    pipe, null = pipeline_from_checkpoint(run["checkpoint"], device="cpu")
    ours = generate(pipe, null, prompts, steps=4, seed=7, output_type="np")
    folder = export(run["checkpoint"], tmp_path / "pipe")
    keys = [k for f in folder.rglob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert keys and not [k for k in keys if "repa" in k or "projector" in k]
    theirs = generate(*load_exported(folder, device="cpu"), prompts, steps=4, seed=7, output_type="np")
    assert float(np.abs(theirs - ours).max()) <= 1e-5


def test_a_class_cond_stage_trains_with_repa_and_its_dit_has_no_projector(world, tmp_path):
    from safetensors import safe_open

    from t2i.dit import load_dit

    run = stage(world, tmp_path / "dit", kind="class-cond", class_column="caption", preset="DiT-tiny/2", steps=3, **repa(world))
    assert all(np.isfinite(x["repa"]) for x in log(tmp_path / "dit"))
    dit_file = Path(run["checkpoint"]) / "transformer" / "diffusion_pytorch_model.safetensors"
    assert not [k for k in safe_open(str(dit_file), "pt").keys() if "repa" in k]
    load_dit(run["checkpoint"], which="model")  # the training weights without the projector


# ---- bad settings and plan ----------------------------------------------------------------------

def _bad(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path / "bert")
    return [(["--repa-weight", "-0.5"], "repa_weight -0.5 is out of range: pass a number from 0 to 100"),
            (["--repa-weight", "0.5"], "repa_weight = 0.5 needs a teacher"),
            (["--teacher", TEACHER, "--repa-weight", "0.5", "--repa-block", "3"], "repa_block = 3 is not a block of a 2-block model"),
            (["--teacher", str(tmp_path / "bert"), "--repa-weight", "0.5"], "(bert) has no patch tokens"),
            (["--teacher", "t2i-data-tests/no-such-teacher", "--repa-weight", "0.5"], "cannot load the REPA teacher 't2i-data-tests/no-such-teacher'")]


def test_bad_repa_settings_are_one_line_errors_with_exit_2_within_15_s(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    for flags, message in _bad(tmp_path):
        start = time.perf_counter()
        r = CliRunner().invoke(cli.app, ["train", "--shards", str(world["captions"]), "--out", str(tmp_path / "o"), "--features",
                                         str(tmp_path / "f"), "--preset", "PixArt-tiny/2", "--resolution", "16", "--vae", world["vae"],
                                         "--text-encoder", world["text_encoder"], *flags])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (flags, r.output)
        assert len(r.output.strip().splitlines()) == 1 and time.perf_counter() - start < 15, r.output
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").rglob("*.parquet"))  # refused before any work


def test_an_unreachable_hub_fails_the_teacher_at_once(tmp_path, monkeypatch):
    """Not offline, but no network: the hub check's one probe, no retries, one line."""
    from shards import hub
    from t2i.features import FeatureConfig, run_features

    for name in ("vae", "t5"):  # local model folders pass the hub check; the teacher is the one asked for
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("no route")))
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot load the REPA teacher 'facebook/dinov2-base': the Hugging Face Hub is not reachable"):
        run_features(tmp_path / "captions", tmp_path / "f", FeatureConfig(vae=str(tmp_path / "vae"), text_encoder=str(tmp_path / "t5"),
                                                                          teacher="facebook/dinov2-base"), progress=False)
    assert time.perf_counter() - start < 15 and not (tmp_path / "f").exists()


def test_plan_prices_the_teacher_pass_its_bytes_and_the_projector(tmp_path):
    from costs.plan import PlanOptions, plan

    body = ('name = "r"\n[defaults]\npreset = "PixArt-S/2"\nbatch_size = 64\nsteps = 1000\ngpus = 8\nresolution = 256\n'
            '[[stages]]\nname = "a"\nshards = "sam/"\n')
    plain, with_repa = tmp_path / "plain.toml", tmp_path / "repa.toml"
    plain.write_text(body)
    with_repa.write_text(body + f'teacher = "{TEACHER}"\nrepa_weight = 0.5\n')
    opts = PlanOptions(gpu="H100", images={"sam": 1e6})
    a, b = (plan(p, opts)["rows"] for p in (plain, with_repa))
    feats = {r["step"]: r for r in a}["features"], {r["step"]: r for r in b}["features"]
    teacher_flops = 1e6 * 2 * (3 * (64 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 64 * 64 * 64) + 64 * 48 * 64)  # 8x8 patches, 3 layers
    assert feats[1]["flops"] - feats[0]["flops"] == pytest.approx(teacher_flops, rel=1e-6)
    assert feats[1]["teacher_bytes_per_image"] == 8 * 8 * 64 * 2 and "teacher" in feats[1]["basis"]
    train = {r["step"]: r for r in a}["train"], {r["step"]: r for r in b}["train"]
    assert 1 < train[1]["flops"] / train[0]["flops"] < 1.2  # the projector on every token


@pytest.mark.slow
def test_repa_on_two_processes_ddp_and_fsdp_gives_the_one_process_losses(tmp_path):
    from typer.testing import CliRunner

    import cli
    from test_t2i_distributed import MANIFEST, cli_args, torchrun
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    world = {"root": tmp_path, **build_tiny_models(tmp_path / "models", simple_corpus(), vae_fit_steps=10)}
    write_simple_world(tmp_path / "captions", 64, rows_per_shard=32)
    (tmp_path / "m.toml").write_text(MANIFEST.replace("[[stages]]", f'teacher = "{TEACHER}"\nrepa_weight = 0.5\n[[stages]]'))
    r = CliRunner().invoke(cli.app, cli_args(world, tmp_path / "one", 6))
    assert r.exit_code == 0, r.output
    torchrun(cli_args(world, tmp_path / "two", 6))
    torchrun(cli_args(world, tmp_path / "fsdp", 6, "--fsdp"))
    one, two, fsdp = ([(x["loss"], x["repa"]) for x in log(tmp_path / run / "s")] for run in ("one", "two", "fsdp"))
    assert len(one) == 6 and all(x[1] > 0 for x in one)
    np.testing.assert_allclose(two, one, rtol=1e-5)  # float sums in another order (as test_t2i_distributed)
    np.testing.assert_allclose(fsdp, one, rtol=1e-5)
