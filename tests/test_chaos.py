"""The chaos suite (benchmarks/chaos_bench.py), short: 2 random kill -9 trials per writing job
plus every specific fault of issue 12. The recorded run uses 20 or more trials per job."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.mark.slow
def test_chaos_short(tmp_path):
    from benchmarks.chaos_bench import render, run_chaos

    result = run_chaos(2, tmp_path, seed=1, log=lambda m: None)
    for name, r in result["jobs"].items():
        assert r.trials == 2 and not r.failed_reruns, (name, r)
        assert r.lost == 0 and r.duplicated == 0, (name, r)
        assert r.unequal == 0, (name, r)  # train: EMA and losses bit-identical to the uninterrupted run
    bad = [(fault, seen) for fault, ok, seen in result["faults"] if not ok]
    assert not bad, bad
    assert len(result["faults"]) == 12
    assert "| train | 2 |" in render(result, 2)


@pytest.mark.slow
def test_chaos_score_select_eval_short(tmp_path):
    """One kill trial each of score, select and eval (benchmarks/chaos_curate_bench.py), with the
    settings change after the kill refused, and nothing lost, duplicated or mixed."""
    from benchmarks.chaos_curate_bench import run_chaos

    results = run_chaos(1, tmp_path, seed=2, log=lambda m: None)
    for name, r in results.items():
        assert r.trials == 1 and not r.failed_reruns, (name, r)
        assert r.lost == 0 and r.duplicated == 0 and r.mixed == 0, (name, r)
        assert r.changes_refused == r.changes_tried, (name, r)
        assert r.changes_tried == r.killed_after_commit, (name, r)
