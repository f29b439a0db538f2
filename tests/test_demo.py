"""The embedded default, shortened: every stage of `t2i-data demo` runs and leaves sane output."""

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from cli import app


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    n_images = cfg["world_train"] + cfg["world_heldout"]

    # 1. the world: an SA-1B-style folder per split, ground truth kept apart
    assert len(list((out / "world" / "sam").rglob("sa_*.jpg"))) == n_images
    assert len(list((out / "world" / "sam").rglob("sa_*.json"))) == n_images
    assert not list((out / "world" / "sam").rglob("*.parquet"))
    # 2. the captioner is a normal HF model directory
    assert (out / "captioner" / "config.json").exists() and (out / "captioner" / "processor_config.json").exists()
    # 3. one caption row per image, no errors, in the shared schema
    caps = pl.read_parquet(str(out / "captions" / "*.parquet"))
    assert caps.height == n_images and caps["key"].n_unique() == n_images
    assert caps["error"].null_count() == n_images and caps["caption"].null_count() == 0
    for split in ("heldout", "train"):
        acc = results["captioner"]["accuracy"][split]
        assert acc["n"] == (cfg["world_heldout"] if split == "heldout" else cfg["world_train"])
        assert all(0 <= acc[a]["accuracy"] <= 1 for a in ("color", "shape", "position"))
    # 4. stats of both caption sets, with plots
    names = [row[0] for row in results["stats"]["rows"]]
    assert names == ["vlm-captions", "alt-texts"]
    assert {p.name for p in (out / "stats").glob("*.png")} >= {"rank_frequency.png"}
    # 5. the arms: a, b, c trained the same steps on the train split only, every kept checkpoint judged
    t2i = results["t2i"]
    assert set(t2i["arms"]) == {"a", "b", "c", "d"}
    assert t2i["rows"]["vlm"] == t2i["rows"]["alt"] == cfg["world_train"]
    for arm in ("a", "b", "c"):
        curve = t2i["arms"][arm]["curve"]
        assert [p["step"] for p in curve] == [cfg["arm_steps"] * (i + 1) // cfg["curve_points"] for i in range(cfg["curve_points"])]
        assert all(p["n"] == cfg["curve_prompts"] and 0 <= p["all"] <= p["color"] <= 1 for p in curve)
    state = json.loads(next((out / "t2i" / "arm-c" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["config"]["init"].startswith("dit:")  # arm c starts from the class-cond DiT
    assert state["features"]["max_tokens"] == 16  # max_tokens 0: the manifest's
    assert json.loads(next((out / "t2i" / "arm-a" / "checkpoints").glob("step-*/trainer_state.json")).read_text())["config"]["init"] == "scratch"
    # the pixel prior on its own: its last checkpoint asked for each held-out scene's class, judged
    prior = t2i["prior"]
    assert prior["classes"] == "shape" and prior["step"] == cfg["dit_steps"] and prior["n"] == cfg["curve_prompts"]
    assert 0 <= prior["shape"] <= 1 and "position" not in prior and len(prior["labels"]) == prior["n"]
    assert (out / "t2i" / "dit" / "judged" / f"prior-step-{cfg['dit_steps']:07d}.json").exists()
    # arm d: (c)'s last checkpoint fine-tuned on the subset `select` wrote; its curve continues (c)'s steps
    assert t2i["arms"]["d"]["curve"][0]["step"] > cfg["arm_steps"]
    sub = t2i["aesthetic"]["subset"]
    assert 0 < sub["selected"] <= sub["rows"] and sub["rows"] == cfg["world_train"]
    assert pl.read_parquet(str(out / "curate" / "selected" / "*.parquet")).height == sub["selected"]
    assert t2i["aesthetic"]["samples"]["n"] == cfg["curve_prompts"]
    # 6. eval: each arm's last checkpoint on one suite drawn from the VLM captions, answered by the shipped judge VLM
    # and checked against the world's exact judge on the same images
    ev = results["eval"]
    assert set(ev) == {"a", "b", "c", "d"} and len({r["prompts"] for r in ev.values()}) == 1
    for arm, r in ev.items():
        assert r["agreement"]["images"] == r["prompts"] and r["agreement"]["questions"] == 4 * r["prompts"]
        assert 0 <= r["agreement"]["agree"] <= 1 and (out / "eval" / f"arm-{arm}" / "eval.html").exists()
    assert ev["d"]["checkpoint"].endswith(f"step-{cfg['finetune_steps']:07d}")
    # 7. the report opens with the three claims, then the curves and the side-by-side samples
    html = (out / "report.html").read_text()
    first = html.index("1. A pixel prior")
    assert first < html.index("2. Dense VLM captions") < html.index("3. A short aesthetic fine-tune") < html.index("Captioner")
    for heading in ("accuracy against steps", "Caption statistics", "score + select"):
        assert heading in html
    assert html.count("data:image/png;base64") >= cfg["examples"] + 2
    assert (out / "report.md").exists() and (out / "figures" / "curves.png").exists() and (out / "figures" / "samples.png").exists()
    assert (out / "figures" / "prior.png").exists() and "The pixel prior (c) starts from" in html
    assert html.count("A VLM judge on your own captions&#x27; suite: ") == 2 and "eval/arm-c/eval.html" in html
    # 8. what it cost: the ledgers of its writing jobs (caption, score, select, features, train, judge), and the full-size plan
    assert {r["job"] for r in results["cost"]["run"]["rows"]} == {"caption", "score", "select", "features", "train", "judge"}
    assert "What it cost" in html and [f["gpu"] for f in results["cost"]["full_size"]][:3] == ["V100", "A100-80GB", "H100"]

    # A rerun resumes: captions and the T2I stage are done, so nothing is redone.
    arm_shards = {p: p.stat().st_mtime_ns for p in (out / "t2i_shards_vlm").glob("*.parquet")}
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["captioner"]["summary"]["skipped"] == n_images and again["captioner"]["summary"]["captioned"] == 0
    assert arm_shards and {p: p.stat().st_mtime_ns for p in (out / "t2i_shards_vlm").glob("*.parquet")} == arm_shards
    # ... and the same seed gives the same numbers (the arms are finished, their judgements cached or redone alike)
    assert again["t2i"]["arms"] == results["t2i"]["arms"] and again["t2i"]["claims"] == results["t2i"]["claims"]
    assert again["t2i"]["prior"] == results["t2i"]["prior"] and again["eval"] == results["eval"]


def test_the_shipped_vae_keeps_the_world_legible():
    """The demo's frozen VAE (fitted offline by `python -m demo.vae`) round-trips world images
    so that the judge still reads colour, position and shape: the ceiling of every arm. Its
    recorded round_trip.json is what this measures."""
    from demo.vae import SHIPPED_VAE, round_trip_accuracy

    acc = round_trip_accuracy(SHIPPED_VAE)
    recorded = json.loads((SHIPPED_VAE / "round_trip.json").read_text())
    assert acc == pytest.approx(recorded, abs=1e-6)
    assert acc["color"] >= 0.95 and acc["position"] >= 0.95 and acc["shape"] >= 0.8


def test_report_warns_when_an_attribute_is_at_chance():
    """All-three comparisons are flagged as noise when (b) or (c) is at chance on an attribute;
    (a) at chance (alt-texts never say where) is the effect itself, not a caveat."""
    from demo.report import chance_caveat

    def arms(shape_b, shape_c):
        final = lambda shape: {"color": 1.0, "position": 1.0, "shape": shape}  # noqa: E731
        return {"a": {"final": {"color": 0.7, "position": 0.2, "shape": 0.25}}, "b": {"final": final(shape_b)}, "c": {"final": final(shape_c)}}

    caveat = chance_caveat(arms(0.27, 0.9), {"prompts": 48})
    assert "shape ((b) 27%, (c) 90%; chance 25%)" in caveat and "position" not in caveat
    assert chance_caveat(arms(0.8, 0.9), {"prompts": 48}) == ""
    # the bar is 2 standard errors over chance: 25% + 12.5% at 48 prompts
    assert chance_caveat(arms(0.36, 0.9), {"prompts": 48}) and not chance_caveat(arms(0.38, 0.9), {"prompts": 48})


def test_claim_headings_follow_their_figures():
    """A claim's heading says 'not shown' when its figures do not carry it: claim 1 whenever an
    attribute is at chance (its all-three figures are then noise), even if (c) met the step target."""
    from demo.report import claim_verdicts

    def results(shape, frac=0.5, a=0.02, b=0.6, margin=0.3, se=0.1, d_change=0.0):
        final = {"color": 1.0, "position": 1.0, "shape": shape}
        arms = {"a": {"final": {"color": 0.7, "position": 0.2, "shape": 0.25}}, "b": {"final": final}, "c": {"final": final}}
        claims = {"c_steps_fraction": frac, "a_final_all": a, "b_final_all": b, "d_all_change": d_change}
        return {"t2i": {"arms": arms, "prompts": 48, "claims": claims, "aesthetic": {"samples": {"margin": margin, "margin_se": se}}}}

    assert claim_verdicts(results(0.9)) == ("shown", "shown", "shown")
    assert claim_verdicts(results(0.25))[0].startswith("not shown (an attribute is at chance")
    assert claim_verdicts(results(0.9, frac=0.8))[0].startswith("not shown")
    assert claim_verdicts(results(0.9, frac=None))[0].startswith("not shown")
    assert claim_verdicts(results(0.9, a=0.1, b=0.2))[1].startswith("not shown")  # 2x, not 3x
    assert claim_verdicts(results(0.9, a=0.0, b=0.06))[1].startswith("not shown")  # 3 of 48: within noise
    assert claim_verdicts(results(0.9, margin=0.15))[2].startswith("not shown")
    assert claim_verdicts(results(0.9, d_change=-0.1))[2].startswith("not shown")


def test_full_demo_is_a_larger_model_and_refuses_quick_with_it(tmp_path):
    """`--full` trains PixArt-mini/2 (a real preset, several times tiny's parameters) for longer;
    `--quick --full` is refused with the one-line error before any work."""
    from demo.run import DemoConfig
    from t2i.models import get_preset

    full, default = DemoConfig.full(str(tmp_path)), DemoConfig(out=str(tmp_path))
    big, small = get_preset(full.preset), get_preset(default.preset)
    assert big.depth * big.hidden**2 >= 4 * small.depth * small.hidden**2
    assert full.arm_steps > default.arm_steps and full.dit_steps > default.dit_steps
    assert full.arm_steps // full.curve_points <= 200  # judged every 200 steps or finer: "reached at 60%" is measurable
    res = CliRunner().invoke(app, ["demo", "--quick", "--full", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--quick, --mid and --full contradict" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_mid_demo_trains_its_dit_stage_at_its_own_lr(tmp_path):
    """`--mid`: PixArt-mini/2 with flow matching, its DiT stage on the layout labels at dit_lr
    (the arms at lr): the settings each stage trains with, as demo.arms builds them."""
    from demo.arms import arm_config, dit_config
    from demo.run import DemoConfig, DemoOptions, _arm_settings

    cfg = DemoOptions(out=str(tmp_path / "o"), mid=True).config()
    assert cfg == DemoConfig.mid(str(tmp_path / "o")) and cfg.preset == "PixArt-mini/2" and cfg.objective == "flow"
    s = _arm_settings(cfg, tmp_path / "t5", progress=False)
    dit, arm = dit_config(s, cfg.dit_steps), arm_config(s, "arm-c", "dit:x", cfg.arm_steps)
    assert (dit.lr, dit.class_column, dit.kind, dit.objective) == (6e-3, "layout", "class-cond", "flow")
    assert (arm.lr, arm.objective, arm.preset, arm.max_tokens) == (3e-3, "flow", "PixArt-mini/2", 32)
    default = _arm_settings(DemoConfig(out=str(tmp_path)), tmp_path / "t5", progress=False)
    assert dit_config(default, 10).lr == default.base.lr  # dit_lr 0: the arms' lr


def test_demo_text_dtype_reaches_every_arm_and_a_bad_one_is_one_line(tmp_path):
    """`--text-dtype int8` stores the arms' T5 features compact (issue 31; the default keeps the
    manifest's float32); an unknown dtype is refused in one line before any work."""
    from demo.run import DemoOptions, _arm_settings

    cfg = DemoOptions(out=str(tmp_path / "a"), quick=True, text_dtype="int8").config()
    assert _arm_settings(cfg, tmp_path / "t5", progress=False).base.text_dtype == "int8"
    default = DemoOptions(out=str(tmp_path / "b"), quick=True).config()
    assert _arm_settings(default, tmp_path / "t5", progress=False).base.text_dtype == "float32"
    res = CliRunner().invoke(app, ["demo", "--quick", "--text-dtype", "int4", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--text-dtype 'int4' is not one of" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_demo_objective_reaches_every_arm_and_flow_drops_the_ddpm_settings(tmp_path):
    """The demo trains with DDPM (v-prediction) by default; `objective = "flow"` makes every arm
    rectified flow with its timestep density, and leaves the DDPM-only settings at their defaults
    (flow refuses them otherwise), so the stage validates."""
    from dataclasses import replace

    from demo.run import DemoConfig, _arm_settings

    ddpm = _arm_settings(DemoConfig(out=str(tmp_path)), tmp_path / "t5", progress=False).base
    assert (ddpm.objective, ddpm.prediction_type) == ("ddpm", "v_prediction")
    flow_cfg = replace(DemoConfig(out=str(tmp_path)), objective="flow", prediction_type="v_prediction", timestep_power=0.6)
    flow = _arm_settings(flow_cfg, tmp_path / "t5", progress=False).base
    assert (flow.objective, flow.timestep_density, flow.prediction_type, flow.timestep_power) == ("flow", "logit_normal", "epsilon", 1.0)
    flow.validate()


def test_full_demo_keeps_the_whole_dense_caption(tmp_path):
    """The T5 of `--full` keeps every token of the world's dense captions (the manifest's 16
    would cut their second sentence, which names colour and shape again)."""
    from transformers import T5TokenizerFast

    from tiny import world as W
    from demo.run import DemoConfig
    from tiny.pixart import build_tiny_text_encoder

    captions = [W.dense_caption(s) for s in W.sample_scenes(200, 0, "any")]
    tok = T5TokenizerFast.from_pretrained(build_tiny_text_encoder(tmp_path / "t5", captions) / "tokenizer")
    longest = max(len(ids) for ids in tok(captions).input_ids)
    assert 16 < longest <= DemoConfig.full(str(tmp_path)).max_tokens


def test_demo_bench_report_only_writes_the_section_the_runs_belong_to(tmp_path):
    """`demo_bench --report-only` reads the mode from each run's recorded configuration, so runs of
    `--full` never land in the default's section; runs made with another configuration are refused."""
    from dataclasses import asdict

    from benchmarks.demo_bench import mode_of
    from demo.run import DemoConfig

    for mode in ("default", "quick", "full"):
        recorded = asdict(DemoConfig.for_mode(mode, str(tmp_path / "seed-1"), 1)) | {"threads": 1}
        assert mode_of(recorded) == mode
        assert mode_of(recorded | {"vae": "/elsewhere/demo/assets/tiny_vae"}) == mode  # a run made in another clone
    stale = asdict(DemoConfig.full(str(tmp_path / "seed-0"))) | {"timestep_power": 1.0}  # an older --full
    with pytest.raises(SystemExit, match="match no configuration"):
        mode_of(stale)
