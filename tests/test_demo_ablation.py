"""The levers' ablation (demo.ablation, benchmarks/_ablation.py): every arm's settings are a stage
TrainConfig accepts, the best combination follows the measurements, and the section's headline
says "not shown" unless a lever beats (c) beyond the judge's noise on every seed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.mark.parametrize("levers", [[], ["flow"], ["repa"], ["token_drop"], ["min_snr"], ["flow", "repa", "token_drop"],
                                    ["repa", "token_drop", "min_snr"]])
def test_every_arm_is_a_valid_stage_of_the_demo(levers):
    from dataclasses import replace

    from demo.ablation import lever_settings, objective_only
    from t2i.train import TrainConfig

    base = TrainConfig(preset="PixArt-tiny/2", prediction_type="v_prediction", resolution=32, init="dit:/x")
    settings = lever_settings(levers)
    replace(base, **settings).validate()  # v-prediction reset for flow, token routing inside 2 blocks, REPA's teacher
    dit = replace(base, init="scratch", kind="class-cond", class_column="shape", preset="DiT-tiny/2", **objective_only(settings))
    dit.validate()
    assert bool(objective_only(settings)) == ("flow" in levers)  # only a flow arm needs its own DiT stage


def test_the_best_combination_follows_the_measurements():
    from demo.ablation import best_combination

    f = lambda a, s: {"all": a, "shape": s}  # noqa: E731
    assert best_combination({"c": f(.3, .3), "flow": f(.2, .2), "repa": f(.4, .4), "token_drop": f(.35, .3),
                             "min_snr": f(.5, .5)}) == ["min_snr", "repa", "token_drop"]
    assert best_combination({"c": f(.3, .3), "flow": f(.5, .5), "min_snr": f(.4, .4), "repa": f(.1, .1)}) == ["flow"]
    assert best_combination({"c": f(.3, .3), "flow": f(.1, .1), "repa": f(.2, .25)}) == ["repa"]  # none above: the best


def test_the_best_combination_trains_in_a_directory_of_its_own_levers():
    """A rerun that adds arms may change the best combination: its stage must not resume the old one's."""
    from demo.ablation import arm_dir_name

    assert arm_dir_name("repa", ["repa"]) == "arm-repa" and arm_dir_name("c", []) == "arm-c"
    old, new = arm_dir_name("best", ["min_snr", "repa", "token_drop"]), arm_dir_name("best", ["flow", "repa", "token_drop"])
    assert old != new and old.startswith("arm-best") and new.startswith("arm-best")
    assert arm_dir_name("best", ["repa", "flow"]) == arm_dir_name("best", ["flow", "repa"])


def _results(c, arm, n=48):
    point = lambda x: {"step": 100, "color": 1.0, "shape": x, "position": 1.0, "all": x}  # noqa: E731
    arms = {"c": {"final": point(c), "curve": [point(c)], "levers": [], "train_s": 1.0, "flops": {"total": 1.0}},
            "repa": {"final": point(arm), "curve": [point(arm)], "levers": ["repa"], "train_s": 1.0, "flops": {"total": 1.1}}}
    return {"arms": arms, "prompts": n, "best": ["repa"], "config": {"arm_steps": 100}}


def test_the_headline_follows_the_measurement():
    from benchmarks._ablation import table, verdicts

    headline, lines = verdicts({0: _results(0.30, 0.40), 1: _results(0.30, 0.45)})  # +10, +15 points on 48 prompts: noise
    assert headline.startswith("No lever shown") and "not shown" in lines[0]
    headline, _ = verdicts({0: _results(0.25, 0.70), 1: _results(0.20, 0.75)})
    assert headline == "Levers that beat arm (c): repa."
    headline, _ = verdicts({0: _results(0.25, 0.70), 1: _results(0.30, 0.30)})  # one seed only: not shown
    assert headline.startswith("No lever shown")
    rows = table({0: _results(0.3, 0.3)})
    assert rows[-1] == "| repa | repa | 30% / 30% | 100 of 100 (100%) | 1.10 |"


def test_the_scale_caveat_follows_arm_c_against_chance():
    """The section says shape differences are the judge's noise only when arm (c) itself is at
    chance on shape (within 2 standard errors of 25%) on every seed."""
    from benchmarks._ablation import shape_of_c

    assert shape_of_c({0: _results(0.21, 0.3), 1: _results(0.17, 0.3)}).endswith("mostly the judge's noise.")
    said = shape_of_c({0: _results(0.60, 0.3), 1: _results(0.20, 0.3)})
    assert "60% on seed 0, 20% on seed 1" in said and "noise" not in said


def test_an_arm_keeps_the_training_time_its_ledger_records(tmp_path):
    """A finished arm a rerun reuses reports the time it trained (every train run of its ledger:
    a resumed arm counts each), not the instant the rerun took to skip it."""
    from demo.ablation import training_time
    from shards.ledger import append_record

    for job, wall, day in (("train", 100.0, 3), ("features", 7.0, 1), ("train", 40.5, 4)):
        append_record(tmp_path, {"job": job, "status": "done", "wall_s": wall, "device_hours": wall / 3600, "energy_kwh": 0.0,
                                 "kg_co2e": 0.0, "energy_source": "estimate", "device_name": "cpu", "started": f"2026-12-0{day}T01:00:00+00:00"})
    assert training_time(tmp_path) == {"train_s": pytest.approx(140.5), "trained_at": "2026-12-03T01:00:00+00:00"}


def test_a_full_scale_run_says_what_it_left_out_and_keeps_the_small_scale_section():
    """A --full run with some levers names the levers it did not run and goes to its own section
    ("levers ablation (--full)"), beside the smaller scale's."""
    from benchmarks._ablation import scope

    said = scope({0: _results(0.6, 0.7)}, "full")
    assert said.startswith("This is --full's model") and "without the levers flow, token_drop, min_snr" in said
    assert "that was not run" in scope({0: _results(0.2, 0.2)}, "default")


def test_a_finished_stage_is_reused_only_with_the_settings_it_was_trained_with(tmp_path):
    """A rerun into the same --out reuses a finished stage when only how it ran changes (threads,
    steps it passed), and refuses in one line when what it learned would differ (here the lr): it
    would otherwise report the old stage's samples as the new settings' (issue 29, arm-best)."""
    from dataclasses import replace

    import torch

    from demo.arms import train_stage
    from shards.errors import UserError
    from t2i.checkpoint import save_checkpoint
    from t2i.train import TrainConfig
    from t2i.train.loop import recorded_config

    for model in ("vae", "t5"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.json").write_text('{"block_out_channels": [8], "d_model": 8}')
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=32, steps=12, lr=1e-3, threads=1, vae=str(tmp_path / "vae"),
                      text_encoder=str(tmp_path / "t5"))
    class Transformer:  # what save_checkpoint needs of the model: its config
        def save_config(self, where):
            where.mkdir(parents=True, exist_ok=True)
            (where / "config.json").write_text("{}")

    weights = {"w": torch.zeros(2)}
    save_checkpoint(tmp_path / "stage", 12, Transformer(), weights, weights, {"state": {}, "param_groups": []},
                    {"step": 12, "config": recorded_config(cfg)})
    never = tmp_path / "no-shards"  # reaching training would fail on it
    assert train_stage(replace(cfg, threads=2, steps=10), tmp_path / "stage", never, never, False)["skipped"] == "finished"
    with pytest.raises(UserError, match=r"stage holds a finished stage trained with other settings: lr 0.001 \(now 0.003\)"):
        train_stage(replace(cfg, lr=3e-3), tmp_path / "stage", never, never, False)
