"""PixArt-Sigma (issue 31, t2i.sigma): a released Sigma checkpoint in diffusers layout (the model's
own folder, or a PixArtSigmaPipeline folder with transformer/) trains from `pixart:` with its null
caption the empty prompt padded to 300 tokens, our guided sample at step 0 is the stock
PixArtSigmaPipeline's, a Sigma stage exports a PixArtSigmaPipeline that draws our samples, KV
compression trains and its export is refused in one line, a DiT imports into Sigma, and models
that are not Sigma's are one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)
TOKENS = 300  # PixArtSigmaPipeline's max_sequence_length
PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    from t2i.encoders import load_text_encoder, load_vae
    from t2i.models import build_transformer
    from t2i.sigma import interpolation_scale
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("sigma")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(root / "captions", 32, rows_per_shard=32)
    torch.manual_seed(5)
    # a "released" Sigma model: no micro-conditions, positions at Sigma's scale; every weight random
    tr = build_transformer("PixArt-tiny/2", 8, 32, use_additional_conditions=False, interpolation_scale=interpolation_scale(8))
    with torch.no_grad():
        for p in tr.parameters():
            p.normal_(0, 0.05)
    tr.save_pretrained(root / "sig_root")
    tok, enc = load_text_encoder(models["text_encoder"])
    vae = load_vae(models["vae"])
    PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root / "sig_pipe")
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=enc, vae=vae, transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root / "alpha_pipe")
    return {"root": root, "captions": root / "captions", "feats": root / "feats", **models}


def cfg_of(world, init: str, **kw):
    from t2i.train import TrainConfig

    base = dict(init=init, family="sigma", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=TOKENS,
                text_dtype="float32", batch_size=8, steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1,
                seed=3, loader_workers=0)
    return TrainConfig(**{**base, **kw})


@torch.no_grad()
def test_null_caption_is_the_empty_prompt_at_300_tokens_and_step_0_guides_as_the_sigma_pipeline(world):
    from diffusers import PixArtSigmaPipeline

    from t2i.encoders import encode_text, load_text_encoder
    from t2i.pipeline import generate
    from t2i.text_cond import TextConditioning

    tok, enc = load_text_encoder(world["text_encoder"])
    emb, mask = encode_text(tok, enc, [""], TOKENS)
    stock = PixArtSigmaPipeline.from_pretrained(world["root"] / "sig_pipe")
    stock.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, output_type="np")
    # the stock pipeline at its own default length (300 tokens): prompt and empty negative both padded to it
    theirs = stock(PROMPTS, negative_prompt="", clean_caption=False, generator=torch.Generator("cpu").manual_seed(7), **kw).images
    # generate without a null caption is the stock call, at the stock pipeline's own length
    assert float(np.abs(generate(stock, None, PROMPTS, steps=4, seed=7, output_type="np") - theirs).max()) < 1e-6
    for folder in ("sig_root", "sig_pipe"):
        model = TextConditioning().build_model(cfg_of(world, f"pixart:{world['root'] / folder}"), 8, 32)
        assert model.null_caption.shape == (300, 32) and torch.equal(model.null_caption, emb[0])
        assert model.null_tokens == int(mask.sum()) == 1
        pipe = PixArtSigmaPipeline(tokenizer=stock.tokenizer, text_encoder=stock.text_encoder, vae=stock.vae,
                                   transformer=model.transformer, scheduler=stock.scheduler)
        pipe.set_progress_bar_config(disable=True)
        ours = generate(pipe, model.null_caption, PROMPTS, steps=4, seed=7, null_tokens=model.null_tokens, output_type="np")
        assert float(np.abs(ours - theirs).max()) < 1e-5, folder
    other = generate(pipe, model.null_caption, PROMPTS, steps=4, seed=7, null_tokens=0, output_type="np")
    assert float(np.abs(other - theirs).max()) > 1e-4  # attended whole, it would not be the stock guidance


def test_trains_from_both_layouts_and_exports_a_sigma_pipeline_that_draws_our_samples(world, tmp_path):
    from diffusers import PixArtSigmaPipeline

    from t2i.export import export, load_exported
    from t2i.pipeline import generate, pipeline_from_checkpoint
    from t2i.stage import run_stage

    for folder in ("sig_root", "sig_pipe"):
        run = run_stage(cfg_of(world, f"pixart:{world['root'] / folder}"), tmp_path / folder, shards=world["captions"],
                        features=world["feats"], progress=False)
        st = json.loads((Path(run["checkpoint"]) / "trainer_state.json").read_text())
        assert run["step"] == 2 and st["null_tokens"] == 1 and st["config"]["family"] == "sigma"
    pipe, null = pipeline_from_checkpoint(run["checkpoint"], device="cpu")
    assert type(pipe) is PixArtSigmaPipeline and null.shape == (300, 32)
    ours = generate(pipe, null, PROMPTS, steps=3, seed=1, output_type="np")
    folder = export(run["checkpoint"], tmp_path / "pipe")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"
    note = (folder / "T2I_EXPORT.md").read_text()
    assert "PixArtSigmaPipeline.from_pretrained" in note and 'T5("") at 300' in note and "PixArtAlphaPipeline" not in note
    assert json.loads((folder / "t2i_export.json").read_text())["max_sequence_length"] == 300
    stock = PixArtSigmaPipeline.from_pretrained(folder)  # diffusers alone loads it
    assert stock.transformer.config.interpolation_scale == 0.125 and not stock.transformer.use_additional_conditions
    epipe, enull = load_exported(folder, device="cpu")
    assert type(epipe) is PixArtSigmaPipeline
    assert float(np.abs(generate(epipe, enull, PROMPTS, steps=3, seed=1, output_type="np") - ours).max()) < 1e-5
    # T2I_EXPORT.md's recipe, run as written by a client with diffusers alone, draws our sampler's images
    (block,) = re.findall(r"```python\n(.*?)```", note, flags=re.S)
    client = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ("t2i", "shards", "tiny", "cli")) + block
    client += f"\nimport numpy as np\nnp.save({str(tmp_path / 'client.npy')!r}, sample({PROMPTS!r}, seed=3, output_type='np'))\n"
    r = subprocess.run([sys.executable, "-c", client], cwd=folder, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    settings = json.loads((folder / "t2i_export.json").read_text())
    ours = generate(epipe, enull, PROMPTS, steps=settings["num_inference_steps"], guidance=settings["guidance_scale"], seed=3,
                    output_type="np")
    assert float(np.abs(np.load(tmp_path / "client.npy") - ours).max()) <= 1e-5


@torch.no_grad()
def test_kv_compression_is_the_strided_average_of_keys_and_values_at_init():
    import torch.nn.functional as F

    from t2i.models import build_transformer
    from t2i.sigma import KVCompress, attach_kv_compress, compressed_layers

    torch.manual_seed(0)
    tr = build_transformer("PixArt-tiny/2", 8, 32, use_additional_conditions=False)
    attach_kv_compress(tr, 2, [1])
    assert compressed_layers(tr) == {1: 2} and tr.config.kv_compress == 2 and tr.config.kv_compress_layers == [1]
    attn = tr.transformer_blocks[1].attn1
    assert isinstance(attn.processor, KVCompress)
    with torch.no_grad():
        attn.processor.norm.weight.normal_()  # a trained LayerNorm, so it is not the identity
    x = torch.randn(2, 4 * 6, 64)  # a 4 x 6 patch grid (non-square, as an aspect bucket)
    attn.processor.grid = (4, 6)
    out = attn(x)

    def squeeze(t):  # reference: 2 x 2 average over the grid, LayerNorm
        t = F.avg_pool2d(t.transpose(1, 2).reshape(2, 64, 4, 6), 2).flatten(2).transpose(1, 2)
        return F.layer_norm(t, (64,), attn.processor.norm.weight, attn.processor.norm.bias)

    q, k, v = attn.to_q(x), squeeze(attn.to_k(x)), squeeze(attn.to_v(x))
    heads = lambda t: t.view(2, -1, 4, 16).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 4, -1)
    assert w.shape[-1] == 6  # each query attends to (4 / 2) x (6 / 2) tokens
    ref = attn.to_out[0]((w @ heads(v)).transpose(1, 2).reshape(2, -1, 64))
    assert float((out - ref).abs().max()) < 1e-5


def test_kv_compressed_stage_trains_samples_and_its_export_is_one_line(world, tmp_path):
    from typer.testing import CliRunner

    import cli
    from t2i.checkpoint import load_weights
    from t2i.pipeline import generate, pipeline_from_checkpoint
    from t2i.sigma import compressed_layers
    from t2i.stage import run_stage

    cfg = cfg_of(world, f"pixart:{world['root'] / 'sig_root'}", kv_compress=2, kv_compress_layers=(1,), steps=3, checkpoint_every=3)
    run = run_stage(cfg, tmp_path / "kv", shards=world["captions"], features=world["feats"], progress=False)
    ck = Path(run["checkpoint"])
    assert json.loads((ck / "transformer" / "config.json").read_text())["kv_compress_layers"] == [1]
    w = load_weights(ck, "model")["transformer.transformer_blocks.1.attn1.processor.sr.weight"]
    assert w.shape == (64, 1, 2, 2) and not torch.allclose(w, torch.full_like(w, 0.25))  # it trained
    pipe, null = pipeline_from_checkpoint(ck, device="cpu")
    assert compressed_layers(pipe.transformer) == {1: 2}
    assert np.isfinite(generate(pipe, null, PROMPTS, steps=2, seed=1, output_type="np")).all()
    r = CliRunner().invoke(cli.app, ["export", str(tmp_path / "kv"), "--out", str(tmp_path / "pipe")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "kv_compress 2 on blocks [1]" in r.output and "PixArtTransformer2DModel cannot represent" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "pipe").exists()
    # LoRA on the kv-compressed checkpoint: its compression comes with it (frozen, trained); on a model without: one line
    lora = run_stage(cfg_of(world, f"checkpoint:{ck}", kv_compress=2, kv_compress_layers=(1,), lora_rank=2), tmp_path / "lora",
                     features=world["feats"], progress=False)
    pipe, null = pipeline_from_checkpoint(lora["checkpoint"], device="cpu")
    assert compressed_layers(pipe.transformer) == {1: 2}
    assert torch.equal(pipe.transformer.transformer_blocks[1].attn1.processor.sr.weight, w)  # the init's, frozen under LoRA
    with pytest.raises(UserError, match="kv_compress with LoRA from init pixart:"):
        cfg_of(world, cfg.init, kv_compress=2, lora_rank=2).validate()
    # a resume with other KV settings: one line
    with pytest.raises(UserError, match=r"kv_compress 2 kv_compress_layers \[1\], this run has sigma 2 \[0, 1\]"):
        run_stage(cfg_of(world, cfg.init, kv_compress=2, kv_compress_layers=(0, 1), steps=4), tmp_path / "kv",
                  features=world["feats"], resume=True, progress=False)


def test_plan_prices_kv_compression():
    from t2i.models import flops_per_image

    full = flops_per_image("PixArt-XL/2", (256, 256), 300)
    half = flops_per_image("PixArt-XL/2", (256, 256), 300, kv_compress=2, kv_blocks=14)
    every = flops_per_image("PixArt-XL/2", (256, 256), 300, kv_compress=2, kv_blocks=28)
    assert every < half < full
    t, h = 128 * 128, 1152  # 2K px: 16384 tokens; one block saves 2 T (T - T/4) h MACs of attention, pays 2 T h of conv
    assert full - half == pytest.approx(3 * 2 * 14 * (2 * t * (t - t // 4) * h - 2 * t * h))


def test_a_dit_imports_into_a_sigma_stage_and_exports_a_sigma_pipeline(world, tmp_path):
    from diffusers import DiTTransformer2DModel

    from t2i.export import export
    from t2i.stage import run_stage

    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6).save_pretrained(tmp_path / "dit")
    run = run_stage(cfg_of(world, f"dit:{tmp_path / 'dit'}", max_tokens=16), tmp_path / "run", shards=world["captions"],
                    features=tmp_path / "feats", progress=False)
    folder = export(run["checkpoint"], tmp_path / "pipe")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "PixArtSigmaPipeline"


def test_models_that_are_not_sigma_are_one_line(world, tmp_path):
    from diffusers import DiTTransformer2DModel
    from typer.testing import CliRunner

    import cli
    from t2i.models import Preset, build_transformer
    from t2i.text_cond import TextConditioning

    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=4, patch_size=2, num_embeds_ada_norm=3).save_pretrained(tmp_path / "dit")
    for init, message in [(f"pixart:{tmp_path / 'dit'}", "holds a DiTTransformer2DModel, not a PixArtTransformer2DModel"),
                          (f"pixart:{world['root'] / 'sig_pipe'}", 'is a PixArtSigmaPipeline, this stage is family = "alpha"')]:
        family = "alpha" if "sig_pipe" in init else "sigma"
        r = CliRunner().invoke(cli.app, ["train", "--shards", str(world["captions"]), "--out", str(tmp_path / "o"), "--init", init,
                                         "--family", family, "--vae", world["vae"], "--text-encoder", world["text_encoder"],
                                         "--resolution", "16"])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert "Traceback" not in r.output and not (tmp_path / "o" / "features").exists()
    # an alpha pipeline's model starts a Sigma stage (Sigma's weak-to-strong start); with size/aspect
    # micro-conditions it could not run in PixArtSigmaPipeline: one line
    assert TextConditioning().build_model(cfg_of(world, f"pixart:{world['root'] / 'alpha_pipe'}"), 8, 32).null_tokens == 1
    build_transformer(Preset(depth=1, hidden=48, heads=2, patch=2), 8, 32, use_additional_conditions=True).save_pretrained(tmp_path / "ms")
    with pytest.raises(UserError, match="uses size/aspect micro-conditions, which PixArtSigmaPipeline does not pass"):
        TextConditioning().build_model(cfg_of(world, f"pixart:{tmp_path / 'ms'}"), 8, 32)
    for bad, message in [(dict(family="gamma"), "family 'gamma' is not one of alpha, sigma"),
                         (dict(kv_compress=0), r"kv_compress must be in \[1, 16\]"),
                         (dict(kv_compress_layers=(3,)), "kv_compress_layers without kv_compress"),
                         (dict(kv_compress=2, token_drop=0.5), "kv_compress with token_drop")]:
        with pytest.raises(UserError, match=message):
            cfg_of(world, "scratch", preset="PixArt-mini/2", **bad).validate()


@torch.no_grad()
def test_a_sigma_model_moved_to_another_resolution_keeps_its_positions_range(world, tmp_path):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from t2i.text_cond import TextConditioning, init_overrides

    model = TextConditioning().build_model(cfg_of(world, f"pixart:{world['root'] / 'sig_root'}", resolution=32), 16, 32)
    tr = model.transformer
    assert tr.config.sample_size == 16 and tr.config.interpolation_scale == pytest.approx(0.25)
    # what the released model (4 x 4 patches, interpolation 0.125) computes on the fly for an 8 x 8 grid: the same span
    want = get_2d_sincos_pos_embed(64, (8, 8), base_size=4, interpolation_scale=0.125, output_type="pt")
    assert torch.allclose(tr.pos_embed.pos_embed[0], want.float(), atol=1e-6)
    # a Sigma checkpoint starting the next stage at twice the side: the same rule (alpha's keeps its overrides)
    (tmp_path / "ck" / "transformer").mkdir(parents=True)
    tr.save_config(tmp_path / "ck" / "transformer")
    assert init_overrides(tmp_path / "ck", 32, False, True) == {"sample_size": 32, "interpolation_scale": pytest.approx(0.5)}
    assert init_overrides(tmp_path / "ck", 16, False, True) == {}
    assert init_overrides(tmp_path / "ck", 128, True, False) == {"sample_size": 128, "use_additional_conditions": True}


def test_the_sigma_manifest_validates_and_plans_its_kv_stage_cheaper(tmp_path):
    from costs.plan import MfuRule, PlanOptions, plan
    from t2i.manifest import load_manifest

    path = Path(__file__).resolve().parent.parent / "manifests" / "pixart-sigma.toml"
    stage = load_manifest(path).stages[0].config
    stage.validate()
    assert (stage.family, stage.max_tokens, stage.vae, stage.kv_compress) == ("sigma", 300, "stabilityai/sdxl-vae", 1)
    # the commented 2K stage, uncommented: priced with and without its KV compression
    lines = path.read_text().splitlines()
    two_k = [line.removeprefix("# ") for line in lines[lines.index("# [[stages]]"):]]
    (tmp_path / "kv.toml").write_text("\n".join(lines + two_k))
    (tmp_path / "no-kv.toml").write_text("\n".join(lines + [line for line in two_k if not line.startswith("kv_compress")]))
    opts = lambda: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.3"))  # noqa: E731
    kv, plain = ({r["name"]: r for r in plan(tmp_path / f, opts())["rows"] if r["step"] == "train"} for f in ("kv.toml", "no-kv.toml"))
    assert set(kv) == {"finetune-1024", "finetune-2k-kv"} and kv["finetune-1024"]["flops"] == plain["finetune-1024"]["flops"]
    assert kv["finetune-2k-kv"]["flops"] / plain["finetune-2k-kv"]["flops"] == pytest.approx(0.752, abs=0.002)
    assert "KV compression r2 on 14 blocks" in kv["finetune-2k-kv"]["basis"]
