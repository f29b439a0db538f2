"""benchmarks/gpu_bench.py --cpu-smoke: every part a GPU session will run is exercised here first
(issue 33: GPU time is 15 minutes), on the tiny preset, so a broken part is found on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_PARTS = ["ours-compile", "ours-compile-bf16p", "ours-compile-ema4", "ours-compile-fp8", "ours-compile-bf16p-ema4-fp8",
              "ours-compile-flow", "ours-compile-repa", "ours-compile-drop50"]


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_of_issue_33s_run_with_the_flops_each_step_does(tmp_path, monkeypatch):
    from benchmarks import gpu_bench
    from t2i.models import flops_per_image

    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "smoke.json"
    report = gpu_bench.main(["--cpu-smoke", "--only", "issue33", "--json", str(out)])
    assert report["errors"] == {} and report["skipped"] == []
    assert set(report["part_seconds"]) == set(gpu_bench.RUNS["issue33"])
    saved = json.loads(out.read_text())
    assert {"profile", "datapath-compact", "features-layout", "features-t5-compile", "features-compact"} <= saved.keys()
    rows = {r["name"]: r for r in saved["results"]}
    assert list(rows) == STEP_PARTS
    assert all(r["step_ms"] > 0 and all(map(lambda v: abs(v) < 1e3, r["extra"]["loss"])) for r in rows.values())
    assert all(name in report["predictions"] for name in STEP_PARTS)  # written before the run
    # FLOPs as each variant does them (MFU's numerator): token dropping routes both of the smoke preset's 2 blocks
    flops = {name: r["extra"]["flops_per_step"] / r["batch"] for name, r in rows.items()}
    assert flops["ours-compile"] == flops_per_image("PixArt-tiny/2", (8, 8), 16, 32)
    assert flops["ours-compile-drop50"] == flops_per_image("PixArt-tiny/2", (8, 8), 16, 32, token_drop=0.5, routed_blocks=2)
    assert flops["ours-compile-drop50"] < 0.7 * flops["ours-compile"]
    assert flops["ours-compile-repa"] > flops["ours-compile"] == flops["ours-compile-flow"]  # + REPA's projector
    repa_terms = len(rows["ours-compile-repa"]["extra"]["loss"])
    assert repa_terms == len(rows["ours-compile"]["extra"]["loss"]) + 1  # the REPA term is logged beside the objective's


def test_report_refuses_a_cpu_smoke_runs_json(tmp_path, capsys):
    from benchmarks.gpu_report import write_report

    before = (ROOT / "BENCHMARKS.md").read_text()
    with pytest.raises(SystemExit) as e:
        write_report({"device": "NVIDIA H100 80GB HBM3", "smoke": False, "results": []}, {"device": "CPU (smoke run)", "smoke": True})
    assert e.value.code == 2 and "run(s) [2] of --report are CPU smoke runs" in capsys.readouterr().err
    assert (ROOT / "BENCHMARKS.md").read_text() == before
