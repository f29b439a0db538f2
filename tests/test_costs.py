"""What a recipe costs: `plan` (figures checked by hand), the ledger of every job on CPU, `cost`
summing runs, the TensorBoard tracker's event file, and the one-line errors."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from costs.cost import sum_ledgers
from shards.ledger import LEDGER, Ledger, RaplCounter
from costs.plan import MfuRule, PlanOptions, parse_images, plan

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent

SMALL = """
name = "small"
[defaults]
preset = "PixArt-S/2"
max_tokens = 120
[[stages]]
name = "one"
shards = "captions/sam"
resolution = 256
batch_size = 4
gpus = 2
steps = 10
"""


def cli(*args: str):
    from cli import app

    return CliRunner().invoke(app, list(args))


def write_manifest(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(text)
    return p


def test_plan_figures_follow_from_flops_images_and_mfu(tmp_path):
    res = plan(write_manifest(tmp_path, SMALL), PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"), price=2.0,
                                                            images=parse_images("sam=7.2k"), caption_rate=2.0))
    rows = {r["step"]: r for r in res["rows"]}
    # by hand, PixArt-S/2 (hidden 384, depth 12, patch 2) at 256 px: 32x32 latents -> 256 tokens, 120 caption tokens.
    # per block: 256*14*384^2 + 120*2*384^2 + 2*256^2*384 + 2*256*120*384 = 637,796,352 MACs
    # x 12 blocks + caption projection 120*(4096*384 + 384^2) + patch 256*16*384*3 = 7,864,713,216 MACs forward
    train_flops_per_image = 6 * 7_864_713_216
    images = 10 * 4 * 2  # steps x batch per GPU x GPUs
    t = rows["train"]
    assert t["images"] == images
    assert t["flops"] == pytest.approx(images * train_flops_per_image)
    hours = images * train_flops_per_image / (989e12 * 0.5) / 3600
    assert t["gpu_hours"] == pytest.approx(hours)
    assert t["wall_hours"] == pytest.approx(hours / 2)
    assert t["usd"] == pytest.approx(hours * 2.0)
    assert t["kwh"] == pytest.approx(hours * 0.700 * 1.2)  # 700 W board power x PUE 1.2
    assert t["kg_co2e"] == pytest.approx(hours * 0.700 * 1.2 * 0.475)  # 475 g/kWh
    # captioning: 7,200 images at 2 img/s = 1 GPU-hour
    assert rows["caption"]["gpu_hours"] == pytest.approx(1.0)
    # features: VAE 272.72 GFLOP at 19.1% MFU + T5 1,116.99 GFLOP at 33.3% MFU per image
    per_image = 272.72e9 / (989e12 * 0.191) + 1116.99e9 / (989e12 * 0.333)
    assert rows["features"]["gpu_hours"] == pytest.approx(7200 * per_image / 3600)
    total = sum(r["gpu_hours"] for r in res["rows"])
    assert res["totals"]["gpu_hours"] == pytest.approx(total)
    assert any("MFU" in a for a in res["assumptions"]) and any("475" in a for a in res["assumptions"])


def test_plan_prices_t5_once_per_caption_field(tmp_path):
    """Features with caption_fields = [caption, caption_short] run T5 twice per image, the VAE once."""
    opts = lambda: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"), images=parse_images("sam=7.2k"), caption_rate=2.0)  # noqa: E731
    two = SMALL.replace("steps = 10", 'steps = 10\ncaption_fields = ["caption", "caption_short"]')
    hours = [next(r for r in plan(write_manifest(tmp_path, m), opts())["rows"] if r["step"] == "features")["gpu_hours"] for m in (SMALL, two)]
    t5 = 1116.99e9 / (989e12 * 0.333) * 7200 / 3600
    assert hours[1] == pytest.approx(hours[0] + t5)


def test_plan_prices_features_at_the_best_measured_job_path(tmp_path):
    """A gpu_bench JSON with issue 33's features parts ("features-best": the fastest VAE layout /
    compile and text path of the features job) prices the features row at those MFUs; without it,
    at the bare encoders' ("features"); with neither, at FEATURES (assumed)."""
    opts = lambda bench: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"), images=parse_images("sam=7.2k"),  # noqa: E731
                                     caption_rate=2.0, gpu_bench=bench)
    bare = {"device": "NVIDIA H100 80GB HBM3", "results": [], "features": {"vae_mfu": 0.2, "t5_mfu": 0.3}}
    best = {**bare, "features-best": {"vae": "compiled", "text": "compiled int8", "resolution": 256, "tokens": 120,
                                      "vae_gflop_per_image": 272.72, "t5_gflop_per_caption": 1116.99, "vae_mfu": 0.4, "t5_mfu": 0.6}}
    rows = [next(r for r in plan(write_manifest(tmp_path, SMALL), opts(b))["rows"] if r["step"] == "features") for b in (None, bare, best)]
    assert "(assumed)" in rows[0]["basis"] and "(measured)" in rows[1]["basis"] and "VAE MFU 40.0%, T5 MFU 60.0%" in rows[2]["basis"]
    per_image = [r["gpu_hours"] * 3600 / 7200 for r in rows]
    assert per_image[1] == pytest.approx(272.72e9 * 1.0 / (989e12 * 0.2) + 1116.99e9 / (989e12 * 0.3), rel=1e-4)
    assert per_image[2] == pytest.approx(per_image[1] / 2, rel=1e-4)


def test_plan_prices_token_dropping_at_the_kept_tokens(tmp_path):
    """A stage with token_drop = 0.5 (routed blocks 1..10 of PixArt-S/2's 12): those blocks at 128
    of the 256 tokens, the same as t2i.models.flops_per_image counts, in FLOPs and GPU-hours."""
    from t2i.models import flops_per_image

    opts = lambda: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"))  # noqa: E731
    dropped = SMALL.replace("steps = 10", "steps = 10\ntoken_drop = 0.5")
    plain, half = (next(r for r in plan(write_manifest(tmp_path, m), opts())["rows"] if r["step"] == "train") for m in (SMALL, dropped))
    want = flops_per_image("PixArt-S/2", (32, 32), token_drop=0.5, routed_blocks=10) / flops_per_image("PixArt-S/2", (32, 32))
    assert half["flops"] / plain["flops"] == pytest.approx(want) and 0.5 < want < 0.7
    assert half["gpu_hours"] / plain["gpu_hours"] == pytest.approx(want)
    assert "token_drop 50% on 10 of 12 blocks" in half["basis"]


def test_plan_takes_mfu_from_a_gpu_bench_json(tmp_path):
    bench = {"device": "NVIDIA H100 80GB HBM3", "results": [
        {"name": "a", "latent": 32, "batch": 64, "images_per_s": 1, "mfu": 0.30},
        {"name": "b", "latent": 32, "batch": 64, "images_per_s": 1, "mfu": 0.40},
        {"name": "c", "latent": 64, "batch": 16, "images_per_s": 1, "mfu": 0.20}]}
    text = SMALL + '[[stages]]\nname = "two"\nshards = "captions/sam"\nresolution = 1024\nbatch_size = 4\ngpus = 2\nsteps = 10\n'
    res = plan(write_manifest(tmp_path, text), PlanOptions(gpu="H100", gpu_bench=bench))
    one, two = [r for r in res["rows"] if r["step"] == "train"]
    assert one["gpu_hours"] == pytest.approx(one["flops"] / (989e12 * 0.40) / 3600)  # best at its latent
    assert two["gpu_hours"] == pytest.approx(two["flops"] / (989e12 * 0.20) / 3600)  # nearest measured latent
    assert "nearest" in two["basis"]
    # --mfu beats the JSON, per resolution
    res = plan(write_manifest(tmp_path, text), PlanOptions(gpu="H100", gpu_bench=bench, mfu=MfuRule.parse("1024=0.1")))
    assert [r for r in res["rows"] if r["name"] == "two"][0]["gpu_hours"] == pytest.approx(two["flops"] / (989e12 * 0.1) / 3600)


def test_plan_reproduces_the_paper_anchor_on_v100():
    res = plan(ROOT / "manifests" / "pixart-alpha.toml", PlanOptions(gpu="V100", mfu=MfuRule.parse("0.21,1024=0.07")))
    paper = {"align-sam-256": 672, "aesthetic-256": 416, "aesthetic-512": 320, "aesthetic-1024": 160}
    days = {r["name"]: r["gpu_days"] for r in res["rows"]}
    assert all(abs(days[k] / v - 1) <= 0.35 for k, v in paper.items()), days
    assert abs(sum(days.values()) / sum(paper.values()) - 1) <= 0.25  # the same four stages: 1,568 V100-days


@pytest.mark.parametrize("body, expected", [
    ('[[stages]]\nname = "a"\nbatch_size = 4\ngpus = 1\n', "stage 'a' has no steps"),
    ('[[stages]]\nname = "b"\nsteps = 4\ngpus = 1\n', "stage 'b' has no batch_size or global_batch"),
    ('[[stages]]\nname = "c"\nsteps = 4\nbatch_size = 4\n', "stage 'c' gives batch_size per GPU but no gpus"),
])
def test_plan_bad_manifest_is_a_one_line_error(tmp_path, body, expected):
    r = cli("plan", str(write_manifest(tmp_path, body)), "--gpu", "H100")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_plan_unknown_gpu_lists_the_known_ones(tmp_path):
    r = cli("plan", str(write_manifest(tmp_path, SMALL)), "--gpu", "B200")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "unknown GPU 'B200'" in lines[0]
    assert all(g in lines[0] for g in ("V100", "A100-40GB", "A100-80GB", "H100", "H200", "L40S", "RTX-4090"))


def test_plan_cli_writes_json_and_markdown(tmp_path):
    r = cli("plan", str(write_manifest(tmp_path, SMALL)), "--gpu", "a100", "--images", "sam=1M", "--out", str(tmp_path / "p"))
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert data["gpu"]["name"] == "A100-80GB" and [x["step"] for x in data["rows"]] == ["caption", "features", "train"]
    assert "| **total** |" in (tmp_path / "p" / "plan.md").read_text()


# --- the ledger -------------------------------------------------------------------------------


def read_ledger(d: Path) -> list[dict]:
    return [json.loads(l) for l in (d / LEDGER).read_text().splitlines()]


def check_record(r: dict, job: str) -> None:
    assert r["job"] == job and r["status"] == "done" and r["device"] == "cpu"
    assert r["wall_s"] > 0 and r["device_hours"] == pytest.approx(r["wall_s"] / 3600, abs=1e-6)
    assert r["energy_kwh"] >= 0 and r["energy_source"]
    assert r["kg_co2e"] == pytest.approx(r["energy_kwh"] * r["pue"] * r["grid_gco2_kwh"] / 1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("costs")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=20)
    write_simple_world(root / "captions", 64, rows_per_shard=64)
    return {"root": root, "captions": root / "captions", **models}


def test_train_and_features_write_ledgers_and_tensorboard_holds_the_scalars(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from t2i.stage import run_stage
    from t2i.train import TrainConfig

    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                      text_dtype="float32", batch_size=16, steps=4, warmup_steps=1, checkpoint_every=2, log_every=2,
                      report_to="tensorboard", name="tb", sample_prompts="a red circle on the left|a blue square")
    out = tmp_path / "run"
    summary = run_stage(cfg, out, shards=world["captions"], progress=False)
    (feat,) = read_ledger(Path(summary["features"]))
    check_record(feat, "features")
    assert feat["images"] == 64
    (rec,) = read_ledger(out)
    check_record(rec, "train")
    assert rec["steps"] == 4 and rec["images"] == 64 and summary["ledger"] == rec

    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "trackers" / "tb")).Reload()
    tags = acc.Tags()["scalars"]
    for key in ("loss", "lr", "grad_norm", "images_per_s", "ledger/device_hours", "ledger/energy_kwh", "ledger/kg_co2e"):
        assert key in tags, tags
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in log] == [2, 4]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert acc.Scalars("ledger/device_hours")[0].value == pytest.approx(rec["device_hours"], rel=1e-5)
    # a grid of the two prompts at each checkpoint (steps 2 and 4), in the event file and as PNGs
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]


def test_caption_writes_a_ledger_into_its_shards_and_manifest(tmp_path):
    from autolabel.api import run_caption
    from autolabel.backends import Generation

    class Fixed:  # a captioner that answers at once: the ledger, not the model, is under test
        name, model_name, processor = "transformers", "fixed", None

        def format_prompt(self, q):
            return q

        def generate(self, images, prompts, params):
            return [Generation("a red square", [1, 2], "stop") for _ in images]

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((40, 60, 3)) * 255).astype("uint8")).save(buf, "JPEG")
        (src / f"{i}.jpg").write_bytes(buf.getvalue())
    run_caption([src], tmp_path / "out", max_new_tokens=2, batch_size=2, progress=False, captioner=Fixed())
    (rec,) = read_ledger(tmp_path / "out")
    check_record(rec, "caption")
    assert rec["images"] == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["last_run"]["ledger"] == rec


def test_cost_sums_two_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_GRID_GCO2_KWH", "100")
    for run, job in (("a", "caption"), ("b", "train"), ("b", "train")):
        Ledger(tmp_path / run, job).close()
    recs = read_ledger(tmp_path / "a") + read_ledger(tmp_path / "b")
    assert all(r["grid_gco2_kwh"] == 100 for r in recs)
    res = sum_ledgers([str(tmp_path / "a"), str(tmp_path / "b")])
    assert res["totals"]["runs"] == 3
    for k in ("device_hours", "energy_kwh", "kg_co2e"):
        assert res["totals"][k] == pytest.approx(sum(r[k] for r in recs))
    assert [(r["job"], r["runs"]) for r in res["rows"]] == [("caption", 1), ("train", 2)]
    r = cli("cost", str(tmp_path))  # a recipe directory: every ledger under it
    assert r.exit_code == 0 and "| **total** | | 3 |" in r.output
    r = cli("cost", str(tmp_path / "nothing"))
    assert r.exit_code == 2 and r.output.startswith("error: ")


def test_energy_from_rapl_counters_with_wraparound(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): inside the package, not added again
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("900000\n")
    c = RaplCounter(str(tmp_path))
    assert c.read_joules() == 0
    (zone / "energy_uj").write_text("200000\n")  # wrapped: 100,000 to the top, then 200,000
    assert c.read_joules() == pytest.approx(0.3)
    rec = Ledger(tmp_path / "run", "train", device="cpu", rapl_root=str(tmp_path)).close()
    assert rec["energy_source"].startswith("rapl") and rec["energy_kwh"] == 0  # counter did not move


def test_energy_from_nvml_counter(tmp_path, monkeypatch):
    readings = iter([5_000_000, 5_000_000 + 3_600_000])  # mJ: 3.6 kJ = 1 Wh between start and close
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByUUID=lambda u: "h",
                                 nvmlDeviceGetHandleByIndex=lambda i: "h",
                                 nvmlDeviceGetTotalEnergyConsumption=lambda h: next(readings))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("shards.ledger._device_name", lambda d: "NVIDIA H100 80GB HBM3")
    rec = Ledger(tmp_path, "train", device="cuda:0").close()
    assert rec["energy_source"] == "nvml" and rec["energy_kwh"] == pytest.approx(0.001)


def test_report_to_unknown_tracker_is_a_one_line_error(tmp_path):
    r = cli("train", "--shards", str(tmp_path), "--out", str(tmp_path / "o"), "--report-to", "neptune")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["error: unknown tracker neptune in report_to: use one or more of tensorboard, wandb, mlflow (comma-separated)"]


def test_a_crashed_job_is_still_recorded(tmp_path):
    import subprocess

    code = f"from shards.ledger import Ledger\nLedger({str(tmp_path)!r}, 'train')\nraise RuntimeError('crash')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "crash" in p.stderr
    (rec,) = read_ledger(tmp_path)
    assert rec["job"] == "train" and rec["status"] == "interrupted" and rec["device_hours"] > 0


def test_plan_prices_kv_compression_at_the_kept_keys(tmp_path):
    """A stage with kv_compress = 2 on 6 of PixArt-S/2's 12 blocks: their self-attention attends
    to a quarter of the tokens (plus the compressing convolution), as flops_per_image counts."""
    from t2i.models import flops_per_image

    opts = lambda: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"))  # noqa: E731
    kv = SMALL.replace("steps = 10", "steps = 10\nkv_compress = 2\nkv_compress_layers = [6, 7, 8, 9, 10, 11]")
    plain, less = (next(r for r in plan(write_manifest(tmp_path, m), opts())["rows"] if r["step"] == "train") for m in (SMALL, kv))
    want = flops_per_image("PixArt-S/2", (32, 32), kv_compress=2, kv_blocks=6) / flops_per_image("PixArt-S/2", (32, 32))
    assert less["flops"] / plain["flops"] == pytest.approx(want) and want < 1
    assert "KV compression r2 on 6 blocks" in less["basis"]


def test_plan_prices_t5_in_training_with_text_dtype_ids(tmp_path):
    """text_dtype ids: features run no T5; training runs it once per sample per step (at T5's MFU)."""
    opts = lambda: PlanOptions(gpu="H100", mfu=MfuRule.parse("0.5"), images=parse_images("sam=7.2k"), caption_rate=2.0)  # noqa: E731
    ids = SMALL.replace("steps = 10", 'steps = 10\ntext_dtype = "ids"')
    rows = [{r["step"]: r for r in plan(write_manifest(tmp_path, m), opts())["rows"]} for m in (SMALL, ids)]
    t5 = 1116.99e9 / (989e12 * 0.333) / 3600
    assert rows[1]["features"]["gpu_hours"] == pytest.approx(rows[0]["features"]["gpu_hours"] - 7200 * t5)
    images = 10 * 4 * 2  # steps x batch_size x gpus
    assert rows[1]["train"]["gpu_hours"] == pytest.approx(rows[0]["train"]["gpu_hours"] + images * t5)
    assert rows[1]["train"]["flops"] == pytest.approx(rows[0]["train"]["flops"] + images * 1116.99e9)
    assert "T5 on demand (text_dtype ids)" in rows[1]["train"]["basis"] and "T5 in training" in rows[1]["features"]["basis"]
