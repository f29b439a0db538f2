"""Training levers (issue 29) on the tiny world: flow matching (its densities, SD3 weightings,
the flow DPM-Solver, export equal to our sampler), min-SNR-gamma, token dropping (TREAD routing:
0 gives the plain run, routing resumes exactly), the validation loss on held-out keys (same value
on a rerun and after a resume, held-out keys never trained on), and every bad setting a one-line
error. Two processes: tests/test_t2i_distributed.py."""

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("levers")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)  # quality does not matter here
    write_simple_world(root / "captions", 128, rows_per_shard=64)
    return {"root": root, "captions": root / "captions", "feats": root / "feats", **models}


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="float32", batch_size=16, steps=6, lr=1e-3, warmup_steps=2, grad_clip=1.0, checkpoint_every=3,
                log_every=1, seed=3, loader_workers=0)
    base.update(kw)
    return TrainConfig(**base)


def stage(world, out: Path, stop_after: int | None = None, **kw) -> dict:
    from t2i.stage import run_stage

    return run_stage(tiny_cfg(world, **kw), out, shards=world["captions"], features=world["feats"], stop_after=stop_after,
                     progress=False)


def log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


def words(n: int) -> np.ndarray:
    from t2i.noise import random_words, sample_keys

    return random_words(sample_keys(0, 0, 0, np.arange(n)), 1)[:, 0]


# ---- flow matching and loss weightings ---------------------------------------------------------

def test_flow_noises_targets_and_draws_per_sample():
    from t2i.flow import FlowMatching, flow_times

    flow = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 250.0, 999.0])
    x_t = flow.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - s * flow.target(x0, noise, t), x0)  # what the flow sampler computes as x0
    w = words(20000)
    for density in ("uniform", "logit_normal"):
        obj = FlowMatching(density=density, shift=3.0)
        drawn = obj.draw_timesteps(w)
        assert torch.equal(drawn[7:8], obj.draw_timesteps(w[7:8]))  # a sample's draw is its word's alone
        assert drawn.dtype == torch.float32 and 0 <= drawn.min() and drawn.max() < 1000
    u = np.array([0.1, 0.5, 0.9])
    logit = [1 / (1 + math.exp(-(0.5 + 2 * statistics.NormalDist().inv_cdf(x)))) for x in u]
    np.testing.assert_allclose(flow_times(u, "logit_normal", 0.5, 2.0), logit, rtol=1e-12)
    np.testing.assert_allclose(flow_times(u, shift=3.0), 3 * u / (1 + 2 * u))
    t = FlowMatching(density="logit_normal").draw_timesteps(w).numpy() / 1000
    assert abs(np.median(t) - 0.5) < 0.02 and 0.55 < np.mean((t > 0.25) & (t < 0.75)) < 0.75  # SD3's bell around 0.5
    shifted = FlowMatching(shift=3.0).draw_timesteps(w).numpy() / 1000
    assert np.mean(shifted > 0.5) > 0.7  # the shift trains the noisy end more often


def test_weightings_match_diffusers():
    from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

    from t2i.diffusion import Diffusion
    from t2i.flow import FlowMatching

    sigmas = torch.linspace(0.02, 0.98, 25)
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ours = FlowMatching(weighting=scheme).weights(sigmas * 1000)
        torch.testing.assert_close(ours, compute_loss_weighting_for_sd3(scheme, sigmas).float().view(-1), rtol=1e-5, atol=1e-6)
    assert FlowMatching(weighting="sigma_sqrt").weights(torch.tensor([0.0])).item() == pytest.approx(1e4)  # capped at t -> 0
    t = torch.tensor([0, 10, 200, 500, 999])
    for pred in ("epsilon", "v_prediction"):
        d = Diffusion(prediction_type=pred, loss_weighting="min_snr", snr_gamma=5.0)
        snr = compute_snr(d.scheduler, t)
        want = torch.clamp(snr, max=5.0) / (snr if pred == "epsilon" else snr + 1)
        torch.testing.assert_close(d.weights(t), want.float(), rtol=1e-4, atol=1e-7)  # float64 tables against float32
    # no weighting: the loss is exactly what it was (MSE + VB)
    g = torch.Generator().manual_seed(1)
    out, x0, noise = torch.randn(5, 8, 4, 4, generator=g), torch.randn(5, 4, 4, 4, generator=g), torch.randn(5, 4, 4, 4, generator=g)
    d = Diffusion()
    losses = d.loss(out, x0, d.add_noise(x0, noise, t), noise, t)
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])
    snr = Diffusion(loss_weighting="min_snr").loss(out, x0, d.add_noise(x0, noise, t), noise, t)
    assert torch.equal(snr["mse"], losses["mse"]) and not torch.equal(snr["loss"], losses["loss"])


BAD = [
    (["--objective", "edm"], "objective 'edm' is not one of ddpm, flow"),
    (["--loss-weighting", "cosmap"], "loss_weighting 'cosmap' is not one for objective 'ddpm' (none, min_snr)"),
    (["--objective", "flow", "--loss-weighting", "min_snr"], "loss_weighting 'min_snr' is not one for objective 'flow'"),
    (["--objective", "flow", "--timestep-density", "beta"], "timestep_density 'beta' is not one of uniform, logit_normal"),
    (["--flow-shift", "3"], "flow_shift = 3.0 is a setting of objective 'flow', this stage trains objective = 'ddpm'"),
    (["--objective", "flow", "--flow-shift", "0"], "flow_shift must be > 0"),
    (["--objective", "flow", "--timestep-power", "0.6"], "timestep_power = 0.6 is a setting of objective 'ddpm'"),
    (["--token-drop", "1"], "token_drop must be in [0, 1)"),
    (["--token-drop", "-0.25"], "token_drop must be in [0, 1)"),
    (["--token-drop", "0.5"], "token_drop routes blocks [1, -1) of a 2-block model: none"),
    (["--val-fraction", "1.5"], "val_fraction must be in [0, 1)"),
    (["--val-every", "-1"], "val_every must be >= 0"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_settings_are_one_line_errors_with_exit_2(tmp_path, flags, message):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", "PixArt-tiny/2",
                                     "--resolution", "16", *flags])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_bad_manifest_only_settings_are_refused():
    from t2i.manifest import parse_manifest

    for body, message in [("val_fraction = 0.1\nval_keys = 4", "hold out keys by one of them"),
                          ("snr_gamma = 0.0", "snr_gamma must be > 0"),
                          ('objective = "flow"\nlogit_std = -1.0', "logit_std must be > 0"),
                          ("val_timesteps = 0", "val_timesteps >= 1"),
                          ('preset = "PixArt-mini/2"\ntoken_drop = 0.5\ntoken_drop_start = 3\ntoken_drop_end = 2', "routes blocks [3, 2)")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            parse_manifest(f'[[stages]]\nname = "a"\n{body}\n')


def test_init_from_a_model_of_another_objective_kind(tmp_path):
    from t2i.objective import check_init_objective

    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "trainer_state.json").write_text(json.dumps({"config": {"prediction_type": "v_prediction"}}))
    with pytest.raises(UserError, match="was trained with objective 'ddpm', this stage trains 'flow'.*no weight conversion"):
        check_init_objective({"objective": "flow"}, tmp_path / "ddpm")
    with pytest.raises(UserError, match="objective 'ddpm'"):  # an ImageNet DiT .pt records nothing: a DDPM model
        check_init_objective({"objective": "flow"}, tmp_path / "DiT-XL-2-256x256.pt")
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)  # an export of a flow model
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "flow_prediction"}))
    check_init_objective({"objective": "flow"}, tmp_path / "pipe")
    with pytest.raises(UserError, match="trained with objective 'flow', this stage trains 'ddpm'"):
        check_init_objective({}, tmp_path / "pipe")


# ---- token dropping -----------------------------------------------------------------------------

def test_routing_keeps_a_per_sample_subset_and_all_tokens_is_the_plain_forward():
    from t2i.dit import DiTWithNull, build_dit
    from t2i.models import PixArtWithNull, Preset, build_transformer
    from t2i.noise import sample_keys
    from t2i.routing import attach_routing, keep_tokens, routing

    keys = sample_keys(1, 0, 0, np.arange(6))
    keep = keep_tokens(keys, 16, 0.75, first=10)
    assert keep.shape == (6, 4) and all(len(set(r.tolist())) == 4 for r in keep) and torch.equal(keep, keep.sort(1).values)
    assert torch.equal(keep_tokens(keys[3:4], 16, 0.75, first=10), keep[3:4])  # its own words, not its neighbours'
    assert keep_tokens(keys, 16, 0.0, first=10) is None

    torch.manual_seed(0)
    pix = PixArtWithNull(build_transformer(Preset(depth=3, hidden=32, heads=2, patch=2), 8, 16), 4)
    dit = DiTWithNull(build_dit("PixArt-tiny/2", 8, 3))
    for p in list(pix.parameters()) + list(dit.parameters()):  # the zero-initialised layers would hide any difference
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    calls = {pix: dict(captions=torch.randn(2, 4, 16, generator=g), caption_mask=torch.ones(2, 4, dtype=torch.long)),
             dit: dict(labels=torch.tensor([0, 2]))}
    for model, (start, end) in ((pix, (1, -1)), (dit, (0, 1))):
        plain = model(x, t, **calls[model])
        attach_routing(model, 0.5, start, end)
        with routing(model, torch.arange(16).expand(2, 16)):
            assert torch.equal(model(x, t, **calls[model]), plain)
        assert torch.equal(model(x, t, **calls[model]), plain)  # outside `routing`: every token, every block
        with routing(model, keep_tokens(keys[:2], 16, 0.5, first=10)):
            routed = model(x, t, **calls[model])
        assert routed.shape == plain.shape and not torch.allclose(routed, plain)
    # gradient checkpointing recomputes the routed blocks: the same loss and gradients
    sub = keep_tokens(keys[:2], 16, 0.5, first=10)
    grads = []
    for ckpt in (False, True):
        (pix.transformer.enable_gradient_checkpointing if ckpt else pix.transformer.disable_gradient_checkpointing)()
        pix.zero_grad(set_to_none=True)
        with routing(pix, sub):
            pix(x, t, **calls[pix]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in pix.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "transformer.transformer_blocks.1.attn1.to_q.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_flops_count_the_routed_blocks():
    from t2i.models import flops_per_image

    plain = flops_per_image("PixArt-XL/2", (32, 32))
    assert flops_per_image("PixArt-XL/2", (32, 32), token_drop=0.0, routed_blocks=26) == plain
    half = flops_per_image("PixArt-XL/2", (32, 32), token_drop=0.5, routed_blocks=26)
    none_routed = flops_per_image("PixArt-XL/2", (32, 32), token_drop=0.5, routed_blocks=0)
    assert none_routed == plain and 0.45 < half / plain < 0.6  # 26 of 28 blocks at half the tokens (attention quarter)


def test_token_drop_zero_is_the_plain_run_and_routing_resumes_exactly(world, tmp_path):
    plain = stage(world, tmp_path / "plain")
    zero = stage(world, tmp_path / "zero", token_drop=0.0, token_drop_start=0, token_drop_end=1)
    assert [x["loss"] for x in log(tmp_path / "zero")] == [x["loss"] for x in log(tmp_path / "plain")]
    routed = dict(token_drop=0.5, token_drop_start=0, token_drop_end=1)
    stage(world, tmp_path / "full", **routed)
    stage(world, tmp_path / "part", stop_after=3, **routed)
    from t2i.train import train

    train(tiny_cfg(world, **routed), tmp_path / "part", features=world["feats"], resume=True, progress=False)
    a, b = [x["loss"] for x in log(tmp_path / "full")], [x["loss"] for x in log(tmp_path / "part")]
    assert a == b and len(a) == 6 and a != [x["loss"] for x in log(tmp_path / "plain")]
    assert plain["step"] == zero["step"] == 6


# ---- flow end to end ----------------------------------------------------------------------------

def test_flow_trains_and_its_export_draws_our_samples_in_diffusers(world, tmp_path):
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import load_file

    from t2i.export import NULL_FILE, export
    from t2i.pipeline import generate, pipeline_from_checkpoint

    run = stage(world, tmp_path / "flow", objective="flow", timestep_density="logit_normal", flow_shift=2.0,
                loss_weighting="cosmap", steps=4)
    rows = log(tmp_path / "flow")
    assert all(np.isfinite([r["loss"] for r in rows])) and {"loss", "mse"} <= rows[0].keys() and "vb" not in rows[0]
    st = json.loads((Path(run["checkpoint"]) / "trainer_state.json").read_text())
    assert st["config"]["objective"] == "flow" and st["config"]["flow_shift"] == 2.0
    prompts = ["a red circle on the left", "a blue square on the right"]
    pipe, null = pipeline_from_checkpoint(run["checkpoint"], device="cpu")
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.flow_shift == 2.0
    ours = generate(pipe, null, prompts, steps=5, seed=7, output_type="np")

    folder = export(run["checkpoint"], tmp_path / "pipe")
    # diffusers alone: the folder, the null caption file, the pipeline's own call
    theirs = PixArtAlphaPipeline.from_pretrained(folder)
    assert type(theirs.scheduler).__name__ == "DPMSolverMultistepScheduler" and theirs.scheduler.config.use_flow_sigmas
    neg = load_file(str(folder / NULL_FILE))["null_caption"]
    emb, mask, _, _ = theirs.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16, clean_caption=False)
    images = theirs(prompt=None, negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg[None].expand(2, -1, -1),
                    negative_prompt_attention_mask=torch.ones(2, neg.shape[0], dtype=mask.dtype), num_inference_steps=5,
                    guidance_scale=4.5, height=16, width=16, use_resolution_binning=False, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(7)).images
    assert images.shape == ours.shape == (2, 16, 16, 3)
    assert float(np.abs(images - ours).max()) <= 1e-5


def test_resume_refuses_another_objective_or_holdout(world, tmp_path):
    from typer.testing import CliRunner

    import cli
    from t2i.train import train

    stage(world, tmp_path / "r", steps=2, checkpoint_every=2)
    for kw, message in [({"objective": "flow"}, "objective 'ddpm' (this run: 'flow')"),
                        ({"loss_weighting": "min_snr"}, "loss_weighting 'none' (this run: 'min_snr')"),
                        ({"val_fraction": 0.25}, "holding out val_fraction 0.0 val_keys 0, this run val_fraction 0.25")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(tiny_cfg(world, steps=4, **kw), tmp_path / "r", features=world["feats"], resume=True, progress=False)
    # the CLI refuses it in one line (a manifest stage: the CLI has no --max-tokens)
    toml = tmp_path / "s.toml"
    toml.write_text('[[stages]]\nname = "r"\npreset = "PixArt-tiny/2"\nresolution = 16\nmax_tokens = 16\ntext_dtype = "float32"\n'
                    'batch_size = 16\nloader_workers = 0\nobjective = "flow"\nsteps = 4\n')
    stage(world, tmp_path / "m" / "r", steps=2, checkpoint_every=2)
    r = CliRunner().invoke(cli.app, ["train", "--manifest", str(toml), "--out", str(tmp_path / "m"), "--features", str(world["feats"]),
                                     "--vae", world["vae"], "--text-encoder", world["text_encoder"]])
    assert r.exit_code == 2 and "objective 'ddpm' (this run: 'flow')" in r.output and "Traceback" not in r.output, r.output
    # a flow stage cannot start from the DDPM checkpoint either
    with pytest.raises(UserError, match="was trained with objective 'ddpm', this stage trains 'flow'"):
        stage(world, tmp_path / "f", objective="flow", init=f"checkpoint:{tmp_path / 'r'}", steps=1)


# ---- validation loss ----------------------------------------------------------------------------

PINNED = [198367012849983736, 17665956581633026203, 5892059997675394209]  # FNV-1a 64 + SplitMix64 finaliser


def test_key_hashes_are_pinned_and_holdouts_nest():
    from t2i.data import Holdout
    from t2i.noise import hash_strings

    # a pure function of the key's bytes: these values must never change (they pick the held-out keys)
    assert hash_strings(["a", "", "captions/sa_1.jpg"]).tolist() == PINNED
    h = hash_strings([f"k{i}" for i in range(1000)])
    frac = Holdout(fraction=0.1).select(h)
    assert 70 < frac.sum() < 130
    five = Holdout(count=5).select(h)
    assert five.sum() == 5 and not (five & ~frac).any()  # the N smallest hashes are inside any fraction holding N
    with pytest.raises(UserError, match="holds out every one of the 3 samples"):
        Holdout(count=3).select(h[:3])



def test_validation_loss_is_the_same_on_a_rerun_and_after_a_resume(world, tmp_path):
    from t2i.data import Holdout, StreamingFeatureDataset
    from t2i.train import train

    # 8 steps of 16 cover an epoch of the keys not held out (the tiny world has 128: about a quarter is held)
    kw = dict(val_fraction=0.25, val_every=2, trace_keys=True, steps=8)
    full = stage(world, tmp_path / "full", **kw)
    stage(world, tmp_path / "again", **kw)
    stage(world, tmp_path / "part", stop_after=3, **kw)
    train(tiny_cfg(world, **kw), tmp_path / "part", features=world["feats"], resume=True, progress=False)
    vals = {name: [(x["step"], x["val_loss"], x["val_mse"], x["val_vb"]) for x in log(tmp_path / name) if "val_loss" in x]
            for name in ("full", "again", "part")}
    assert [v[0] for v in vals["full"]] == [2, 4, 6, 8] and all(np.isfinite(v[1]) for v in vals["full"])
    assert vals["full"] == vals["again"] == vals["part"]
    assert vals["full"][0][1] != vals["full"][-1][1]  # it moves with the model
    ds = StreamingFeatureDataset(full["features"], 16, holdout=Holdout(0.25))
    held = set(ds.get(ds.val_indices).keys)
    assert full["val_samples"] == len(held) and 16 < len(held) < 48
    trained = {k for line in (tmp_path / "full" / "trace" / "rank-0.jsonl").read_text().splitlines()
               for k in json.loads(line).get("keys", [])}
    assert trained and not trained & held and len(trained | held) == 128
