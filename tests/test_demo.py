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
    # 5. the T2I model trained only on the train split, sampled and judged for both prompt sets
    t2i = results["t2i"]
    assert t2i["samples"] == cfg["world_train"] and t2i["steps"] == cfg["t2i_steps"]
    assert set(t2i["score"]) == {"train-combos", "heldout-combos"}
    assert all(t2i["score"][s]["n"] == cfg["samples_per_split"] for s in t2i["score"])
    # 6. the report carries the measured numbers and inlined images
    html = (out / "report.html").read_text()
    for heading in ("Captioner", "Caption statistics", "Text-to-image", "Samples per prompt"):
        assert heading in html
    assert html.count("data:image/png;base64") >= cfg["examples"] + 2
    assert (out / "report.md").exists()
    # 7. what it cost: the ledgers of its caption, features and train jobs, and the full-size plan
    assert {r["job"] for r in results["cost"]["run"]["rows"]} == {"caption", "features", "train"}
    assert "What it cost" in html and [f["gpu"] for f in results["cost"]["full_size"]][:3] == ["V100", "A100-80GB", "H100"]

    # A rerun resumes: captions and the T2I stage are done, so nothing is redone.
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    again = json.loads((out / "results.json").read_text())
    assert again["captioner"]["summary"]["skipped"] == n_images and again["captioner"]["summary"]["captioned"] == 0
