"""LoRA stages (issue 31, t2i.lora through peft) on the tiny world: only the adapter trains and is
checkpointed, resume is exact and refuses other LoRA settings, merged and unmerged outputs agree,
`export --lora` gives an adapter peft loads onto the exported pipeline, `export --merge` the merged
weights, `plan` prices the stage, and bad settings are one line before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shards.errors import UserError

pytest.importorskip("peft")
torch.set_num_threads(1)

LORA = dict(init="", lora_rank=4, lora_alpha=8.0, lr=1e-2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("lora")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(root / "captions", 128, rows_per_shard=64)
    w = {"root": root, "captions": root / "captions", "feats": root / "feats", **models}
    stage(w, root / "base", steps=4, checkpoint_every=4)  # a full run: the base the adapters fine-tune
    return w


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="float32", batch_size=16, steps=6, lr=1e-3, warmup_steps=2, grad_clip=1.0, checkpoint_every=3,
                log_every=1, seed=3, loader_workers=0)
    base.update(kw)
    if base.get("init") == "":
        base["init"] = f"checkpoint:{world['root'] / 'base'}"
    return TrainConfig(**base)


def stage(world, out: Path, stop_after: int | None = None, **kw) -> dict:
    from t2i.stage import run_stage

    return run_stage(tiny_cfg(world, **kw), out, shards=world["captions"], features=world["feats"], stop_after=stop_after,
                     progress=False)


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "log.jsonl").read_text().splitlines()]


def forward(tr, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 16, tr.config.caption_channels, generator=g)
    with torch.no_grad():
        return tr(x, encoder_hidden_states=c, encoder_attention_mask=torch.ones(2, 16), timestep=torch.tensor([10, 700]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def test_only_the_adapter_trains_and_is_checkpointed(world, tmp_path):
    from t2i import checkpoint as ckpt

    run = stage(world, tmp_path / "lora", steps=3, **LORA)
    ck = Path(run["checkpoint"])
    model, ema = load_file(ck / "model.safetensors"), load_file(ck / "ema.safetensors")
    assert model and set(model) == set(ema) and all(".lora_" in k for k in model)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in model} == {"to_q", "to_k", "to_v", "0"}
    assert any(float(v.abs().max()) > 0 for k, v in model.items() if "lora_B" in k)  # it moved
    # the frozen base is the init's weights, untouched (null caption included), written once
    base = load_file(tmp_path / "lora" / "lora_base" / "model.safetensors")
    init = load_file(ckpt.latest_checkpoint(world["root"] / "base") / "model.safetensors")
    assert base.keys() == init.keys() and all(torch.equal(base[k], init[k]) for k in base)
    st = json.loads((ck / "trainer_state.json").read_text())
    assert st["lora"] == {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"], "lora_variant": "lora"}
    # the merged model differs from the base only in the adapted layers
    merged, null = ckpt.load_transformer(ck, "model")
    plain = {k.removeprefix("transformer."): v for k, v in base.items() if k.startswith("transformer.")}
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, plain[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") and ".attn" in k for k in changed)
    assert torch.equal(null, base["null_caption"])


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merged_and_unmerged_agree_and_the_adapter_changes_the_output(world, tmp_path, variant):
    from t2i import checkpoint as ckpt

    run = stage(world, tmp_path / variant, steps=3, lora_variant=variant, **LORA)
    kept, _ = ckpt.load_transformer(run["checkpoint"], "model", adapter="keep")
    merged, _ = ckpt.load_transformer(run["checkpoint"], "model")
    base, _ = ckpt.load_transformer(tmp_path / variant / "lora_base", "model")
    a, b, c = forward(kept), forward(merged), forward(base)
    assert float((a - b).abs().max()) < 1e-5
    assert float((a - c).abs().max()) > 1e-4  # the adapter is not a no-op
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_resume_is_exact(world, tmp_path):
    from t2i.train import train

    stage(world, tmp_path / "full", **LORA)
    stage(world, tmp_path / "part", stop_after=3, **LORA)
    train(tiny_cfg(world, **LORA), tmp_path / "part", features=world["feats"], resume=True, progress=False)
    assert losses(tmp_path / "full") == losses(tmp_path / "part") and len(losses(tmp_path / "full")) == 6
    a, b = (tmp_path / r / "checkpoints" / "step-0000006" for r in ("full", "part"))
    for name in ("model", "ema", "optimizer"):
        x, y = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_resume_refuses_other_lora_settings(world, tmp_path):
    from typer.testing import CliRunner

    import cli
    from t2i.train import train

    stage(world, tmp_path / "r", steps=2, checkpoint_every=2, **LORA)
    for kw, message in [({"lora_rank": 8}, "lora_rank 4 lora_alpha 8.0"),
                        ({"lora_rank": 0}, "this run has lora_rank 0 (no LoRA)"),
                        ({"lora_targets": ("to_q",)}, "lora_targets ['to_q']"),
                        ({"lora_variant": "dora"}, "lora_variant dora")]:
        with pytest.raises(UserError, match="resume with the checkpoint's LoRA settings") as e:
            train(tiny_cfg(world, steps=4, **{**LORA, **kw}), tmp_path / "r", features=world["feats"], resume=True, progress=False)
        assert message in str(e.value) and "\n" not in str(e.value)
    # the CLI: one line (a manifest stage: the CLI has no --max-tokens)
    toml = tmp_path / "s.toml"
    toml.write_text(f'[[stages]]\nname = "r"\npreset = "PixArt-tiny/2"\nresolution = 16\nmax_tokens = 16\ntext_dtype = "float32"\n'
                    f'batch_size = 16\nloader_workers = 0\nsteps = 4\ninit = "checkpoint:{world["root"] / "base"}"\nlora_rank = 2\n')
    stage(world, tmp_path / "m" / "r", steps=2, checkpoint_every=2, **LORA)
    r = CliRunner().invoke(cli.app, ["train", "--manifest", str(toml), "--out", str(tmp_path / "m"), "--features", str(world["feats"]),
                                     "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--resume"])
    assert r.exit_code == 2 and "resume with the checkpoint's LoRA settings" in r.output and "Traceback" not in r.output, r.output


BAD = [
    (["--lora-rank", "-1"], "lora_rank must be >= 1 (0: LoRA off), got -1"),
    (["--lora-rank", "4", "--lora-targets", "to_q,to_nothing"], "lora target 'to_nothing' is no linear layer of a PixArt transformer"),
    (["--lora-rank", "4", "--lora-targets", "attn1"], "lora target 'attn1' is no linear layer"),
    (["--lora-rank", "4", "--lora-variant", "lokr"], "lora_variant 'lokr' is not one of lora, dora"),
    (["--lora-rank", "4", "--lora-alpha", "-2"], "lora_alpha must be >= 0"),
    (["--lora-rank", "4", "--kind", "class-cond", "--class-column", "shape"], "LoRA adapts text-to-image stages"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_lora_settings_are_one_line_before_any_work(tmp_path, flags, message):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "PixArt-tiny/2",
                                     "--resolution", "16", *flags])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists(), r.output


def test_a_target_beyond_the_models_blocks_is_one_line_when_built(world, tmp_path):
    with pytest.raises(UserError, match=r"lora target 'transformer_blocks.7.attn1.to_q' is no linear layer of init checkpoint:"):
        stage(world, tmp_path / "deep", steps=1, lora_targets=("transformer_blocks.7.attn1.to_q",), **LORA)


def test_export_lora_loads_into_the_exported_pipeline_and_merge_matches(world, tmp_path):
    from peft import PeftModel
    from typer.testing import CliRunner

    import cli
    from t2i.export import export
    from t2i.pipeline import generate

    run = stage(world, tmp_path / "x", steps=3, **LORA)
    ad, mg = export(run["checkpoint"], tmp_path / "ad", lora="adapter"), export(run["checkpoint"], tmp_path / "mg", lora="merge")
    assert (ad / "transformer_lora" / "adapter_config.json").is_file() and not (mg / "transformer_lora").exists()
    assert json.loads((ad / "t2i_export.json").read_text())["lora"]["adapter"] == "transformer_lora"
    from t2i.export import load_exported

    prompts = ["a red circle on the left"]
    pipe, null = load_exported(ad, device="cpu")
    plain = generate(pipe, null, prompts, steps=3, seed=1, output_type="np")
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, ad / "transformer_lora")  # T2I_EXPORT.md's recipe
    adapted = generate(pipe, null, prompts, steps=3, seed=1, output_type="np")
    merged_pipe, _ = load_exported(mg, device="cpu")
    merged = generate(merged_pipe, null, prompts, steps=3, seed=1, output_type="np")
    assert float(np.abs(adapted - plain).max()) > 1e-4  # the adapter changes the exported pipeline's output
    assert float(np.abs(adapted - merged).max()) < 1e-5
    # --lora on a full fine-tune, and --lora with --merge: one line each
    for flags, message in [(["--lora"], "has no LoRA adapter (a full fine-tune)"), (["--lora", "--merge"], "--lora and --merge together")]:
        r = CliRunner().invoke(cli.app, ["export", str(world["root"] / "base"), "--out", str(tmp_path / "bad"), *flags])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_plan_prices_a_lora_stage(tmp_path):
    from costs.plan import MfuRule, PlanOptions, lora_stage_price, plan

    full, lora = lora_stage_price("PixArt-XL/2", 256, lora_rank=0), lora_stage_price("PixArt-XL/2", 256, lora_rank=16)
    assert full["trainable_params"] > 600e6 and 5e6 < lora["trainable_params"] < 20e6
    # by hand: per block, rank 16 x (in + out) on attn1 q/k/v/out and attn2 q/k/v/out, all 1152 -> 1152 (XL/2)
    assert lora["trainable_params"] == 28 * 8 * 16 * (1152 + 1152)
    assert lora["optimizer_bytes"] == lora["trainable_params"] * 8 and full["optimizer_bytes"] == full["trainable_params"] * 8
    assert full["step_flops_per_image"] > lora["step_flops_per_image"] > 2 / 3 * full["step_flops_per_image"]
    text = '[[stages]]\nname = "ft"\npreset = "PixArt-XL/2"\nresolution = 256\nbatch_size = 4\ngpus = 1\nsteps = 10\n'
    rows = []
    for extra in ("", "lora_rank = 16\n"):
        (tmp_path / "m.toml").write_text(text + extra)
        rows.append(next(r for r in plan(tmp_path / "m.toml", PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5")))["rows"] if r["step"] == "train"))
    assert rows[1]["flops"] / rows[0]["flops"] == pytest.approx(lora["step_flops_per_image"] / full["step_flops_per_image"])
    assert "LoRA r16: 8.3M trainable, AdamW state 63 MiB, step FLOPs 68% of full" in rows[1]["basis"]
    # with REPA too, the projector trains in full: its weights are trainable and its matmuls cost 3x on every token
    macs = 1000
    both = lora_stage_price("PixArt-XL/2", 256, lora_rank=16, token_macs=macs)
    tokens = (256 // 8 // 2) ** 2
    assert both["trainable_params"] == lora["trainable_params"] + macs
    assert both["step_flops_per_image"] == pytest.approx(lora["step_flops_per_image"] + 3 * 2 * tokens * macs)


def test_manifest_lora_settings_are_checked_when_read():
    from t2i.manifest import parse_manifest

    manifest = parse_manifest('[[stages]]\nname = "ft"\nlora_rank = 8\nlora_targets = ["to_q", "attn2.to_v"]\n')
    assert manifest.stages[0].config.lora_targets == ("to_q", "attn2.to_v")
    with pytest.raises(UserError, match="lora target 'to_z' is no linear layer"):
        parse_manifest('[[stages]]\nname = "ft"\nlora_rank = 8\nlora_targets = ["to_z"]\n')
