"""`init = "pixart:..."` (issue 31): a released PixArt-alpha checkpoint in diffusers layout (the
model's own folder, or a pipeline folder with transformer/) trains as a stage's start; its null
caption is the text encoder's padded empty prompt, attended as PixArtAlphaPipeline attends its
negative prompt, so our guided sample at step 0 is the stock pipeline's; a folder holding another
model and an unreachable hub id are one line."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)
TOKENS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from t2i.encoders import load_text_encoder, load_vae
    from t2i.models import build_transformer
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("pixart")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(root / "captions", 64, rows_per_shard=64)
    torch.manual_seed(5)
    tr = build_transformer("PixArt-tiny/2", 8, 32, use_additional_conditions=False)  # 16 px: the tiny VAE halves
    with torch.no_grad():  # a "released" model: every weight random, so captions and the null branch matter
        for p in tr.parameters():
            p.normal_(0, 0.05)
    tr.save_pretrained(root / "pix_root")  # the model's own folder (config.json at its root)
    tok, enc = load_text_encoder(models["text_encoder"])
    PixArtAlphaPipeline(tokenizer=tok, text_encoder=enc, vae=load_vae(models["vae"]), transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root / "pix_pipe")  # transformer/ subfolder
    return {"root": root, "captions": root / "captions", "feats": root / "feats", **models}


def cfg_of(world, init: str, **kw):
    from t2i.train import TrainConfig

    base = dict(init=init, resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=TOKENS,
                text_dtype="float32", batch_size=16, steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1,
                seed=3, loader_workers=0)
    return TrainConfig(**{**base, **kw})


@torch.no_grad()
def test_null_caption_is_the_empty_prompt_and_step_0_guides_as_the_released_pipeline(world):
    from diffusers import PixArtAlphaPipeline

    from t2i.encoders import encode_text, load_text_encoder
    from t2i.pipeline import generate
    from t2i.text_cond import TextConditioning

    tok, enc = load_text_encoder(world["text_encoder"])
    emb, mask = encode_text(tok, enc, [""], TOKENS)
    stock = PixArtAlphaPipeline.from_pretrained(world["root"] / "pix_pipe")
    stock.set_progress_bar_config(disable=True)
    prompts = ["a red circle on the left", "a blue square"]
    kw = dict(num_inference_steps=4, guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, output_type="np")
    theirs = stock(prompts, negative_prompt="", max_sequence_length=TOKENS, clean_caption=False,
                   generator=torch.Generator("cpu").manual_seed(7), **kw).images
    for folder in ("pix_root", "pix_pipe"):
        model = TextConditioning().build_model(cfg_of(world, f"pixart:{world['root'] / folder}"), 8, 32)
        assert torch.equal(model.null_caption, emb[0]) and model.null_tokens == int(mask.sum()) == 1
        pipe = PixArtAlphaPipeline(tokenizer=stock.tokenizer, text_encoder=stock.text_encoder, vae=stock.vae,
                                   transformer=model.transformer, scheduler=stock.scheduler)
        pipe.set_progress_bar_config(disable=True)
        ours = generate(pipe, model.null_caption, prompts, steps=4, seed=7, null_tokens=model.null_tokens, output_type="np")
        assert float(np.abs(ours - theirs).max()) < 1e-5, folder
    # attended whole (the old random-null way) it would not be the released pipeline's guidance
    other = generate(pipe, model.null_caption, prompts, steps=4, seed=7, null_tokens=0, output_type="np")
    assert float(np.abs(other - theirs).max()) > 1e-4


def test_trains_from_both_layouts_and_samples_and_exports_with_the_empty_prompt_null(world, tmp_path):
    from t2i.export import export, load_exported
    from t2i.pipeline import generate, pipeline_from_checkpoint
    from t2i.stage import run_stage

    for folder in ("pix_root", "pix_pipe"):
        run = run_stage(cfg_of(world, f"pixart:{world['root'] / folder}"), tmp_path / folder, shards=world["captions"],
                        features=world["feats"], progress=False)
        st = json.loads((Path(run["checkpoint"]) / "trainer_state.json").read_text())
        assert run["step"] == 2 and st["null_tokens"] == 1
    pipe, null = pipeline_from_checkpoint(run["checkpoint"], device="cpu")
    assert pipe.t2i_null_tokens == 1
    ours = generate(pipe, null, ["a red circle"], steps=3, seed=1, output_type="np")
    folder = export(run["checkpoint"], tmp_path / "pipe")
    assert json.loads((folder / "t2i_export.json").read_text())["null_tokens"] == 1
    epipe, enull = load_exported(folder, device="cpu")
    assert float(np.abs(generate(epipe, enull, ["a red circle"], steps=3, seed=1, output_type="np") - ours).max()) < 1e-5
    # a LoRA stage from the released model keeps the same null (frozen) and its mask
    if importlib.util.find_spec("peft"):  # (LoRA's own tests: tests/test_t2i_lora.py)
        lora = run_stage(cfg_of(world, f"pixart:{world['root'] / 'pix_root'}", lora_rank=2), tmp_path / "lora",
                         features=world["feats"], progress=False)
        assert json.loads((Path(lora["checkpoint"]) / "trainer_state.json").read_text())["null_tokens"] == 1


def test_a_folder_with_another_model_and_an_unreachable_hub_id_are_one_line(world, tmp_path):
    from diffusers import DiTTransformer2DModel
    from typer.testing import CliRunner

    import cli

    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=4, patch_size=2, num_embeds_ada_norm=3).save_pretrained(tmp_path / "dit")
    for init, message in [(f"pixart:{tmp_path / 'dit'}", "holds a DiTTransformer2DModel, not a PixArtTransformer2DModel"),
                          ("pixart:no-such-org/no-such-pixart", "no-such-org/no-such-pixart")]:
        r = CliRunner().invoke(cli.app, ["train", "--shards", str(world["captions"]), "--out", str(tmp_path / "o"), "--init", init,
                                         "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--resolution", "16"])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert "Traceback" not in r.output and not (tmp_path / "o" / "features").exists()
    # with the default VAE and text encoder (hub ids, unreachable here) the released model is named first
    r = CliRunner().invoke(cli.app, ["train", "--shards", str(world["captions"]), "--out", str(tmp_path / "o"),
                                     "--init", "pixart:PixArt-alpha/PixArt-XL-2-512x512"])
    assert r.exit_code == 2 and "PixArt-alpha/PixArt-XL-2-512x512" in r.output and "VAE" not in r.output, r.output
    with pytest.raises(UserError, match="holds a DiTTransformer2DModel"):
        from t2i.text_cond import load_pixart

        load_pixart(str(tmp_path / "dit"), None)
