"""evals: the public suites (GenEval, T2I-CompBench, DPG-Bench) as judge questions, preference
scores by a CLIP-architecture model given as a directory, and quality against cost (the run's ledger).

The end-to-end run uses an untrained tiny judge (the mechanics, not its answers), as test_evals does.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from evals import public as P

# The published sizes: GenEval's paper (553 prompts, 6 tasks), T2I-CompBench's val split (300 per
# category), DPG-Bench (1065 dense prompts).
GENEVAL_COUNTS = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_public_suites_parse_with_the_published_category_counts():
    geneval = P.load_public("geneval")
    assert len(geneval) == 553 and Counter(p["category"] for p in geneval) == GENEVAL_COUNTS
    assert len({p["id"] for p in geneval}) == 553 and all(p["questions"] for p in geneval)
    compbench = P.load_public("t2i-compbench")
    assert Counter(p["category"] for p in compbench) == {c: 300 for c in P.COMPBENCH_CATEGORIES}
    assert all(len(p["questions"]) == 1 and p["prompt"].rstrip(".") in p["questions"][0][1] for p in compbench)
    texts = P.dpg_texts()
    assert len(texts) == 1065 and all(t.strip() for t in texts.values())
    assert [len(P.load_public(s, limit=2)) for s in ("geneval", "t2i-compbench")] == [12, 12]
    for f in ("geneval/LICENSE", "t2i_compbench/LICENSE", "dpg/LICENSE", "SOURCE.md"):
        assert (P.SUITES_DIR / f).is_file(), f


def test_geneval_questions_follow_its_metadata():
    q = P.geneval_questions
    assert q({"prompt": "a photo of an apple", "include": [{"class": "apple", "count": 1}]}) == [
        ["object", "Is there an apple in the image?"]]
    assert q({"prompt": "a photo of three sports balls", "include": [{"class": "sports ball", "count": 3}],
              "exclude": [{"class": "sports ball", "count": 4}]}) == [["count", "Are there exactly three sports balls in the image?"]]  # fmt: skip
    meta = {"prompt": "a photo of a dog right of a teddy bear",
            "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}  # fmt: skip
    assert q(meta)[-1] == ["position", "Is the dog to the right of the teddy bear?"]
    colours = q({"prompt": "a photo of a purple wine glass and a black apple", "include": [
        {"class": "wine glass", "count": 1, "color": "purple"}, {"class": "apple", "count": 1, "color": "black"}]})
    assert [k for k, _ in colours] == ["object", "color", "object", "color"] and colours[3][1] == "Is the apple black?"
    kinds = Counter(k for p in P.load_public("geneval") for k, _ in p["questions"])
    assert set(kinds) == {"object", "count", "color", "position"} and kinds["position"] == 100


DPG_CSV = """item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language
0,csv text,k,1,0,entity,whole,entity - whole (cabbage),Are there cabbages?
0,csv text,k,2,1,other,count,other - count (cabbage ==8),Are there eight cabbages?
0,csv text,k,3,1,attribute,color,attribute - color (cabbage green),Are the cabbages green?
x1,only here,k,1,0,entity,whole,entity - whole (cat),Is there a cat?
"""


def test_dpg_questions_keep_their_dependencies(tmp_path):
    prompts = P.parse_dpg_csv(DPG_CSV, P.dpg_texts())
    assert [p["id"] for p in prompts] == ["dpg-0", "dpg-x1"]
    first = prompts[0]
    assert first["prompt"] == P.dpg_texts()["0"] and prompts[1]["prompt"] == "only here"
    assert [k for k, _ in first["questions"]] == ["entity", "other", "attribute"] and first["parents"] == [[], [0], [0]]
    assert P.prompt_score([True, True, False], first["parents"]) == pytest.approx(2 / 3)
    assert P.prompt_score([False, True, True], first["parents"]) == 0.0, "a no parent zeroes its children"
    (tmp_path / "dpg.csv").write_text(DPG_CSV)
    assert len(P.load_public("dpg", tmp_path / "dpg.csv")) == 2
    rows = [{"key": f"dpg-0-{i}", "error": None, "answer": a, "score": s} for i, (a, s) in enumerate([("no", .2), ("yes", .9), ("yes", .8)])]
    rows.append({"key": "dpg-x1-0", "error": None, "answer": "yes", "score": 0.7})
    out = P.summarize_public("dpg", prompts, rows)
    assert out["overall"] == pytest.approx(0.5) and out["questions"]["entity"] == pytest.approx(0.5)
    assert out["drawn"]["dpg"] == pytest.approx(0.5) and out["judged"] == 4


def test_missing_prompt_files_are_one_line_errors(tmp_path):
    from evals.suite import SuiteConfig
    from shards.errors import UserError

    for cfg, words in ((SuiteConfig(suite="dpg", suite_file=tmp_path / "none.csv"), "does not exist"),
                       (SuiteConfig(suite="t2i-compbench", suite_file=tmp_path), "color_val.txt is missing"),
                       (SuiteConfig(suite="geneval", shards=tmp_path), "--shards is for --suite own"),
                       (SuiteConfig(suite="own", shards=tmp_path, limit=3), "--limit is for the public suites"),
                       (SuiteConfig(suite="nope"), "unknown --suite")):  # fmt: skip
        with pytest.raises(UserError, match=words) as e:
            cfg.validate()
        assert "\n" not in str(e.value)
    if not (P.SUITES_DIR / "dpg" / "dpg_bench.csv").is_file():
        with pytest.raises(UserError, match="curl -L -o .*dpg_bench.csv"):
            SuiteConfig(suite="dpg").validate()


def test_cost_up_to_a_step_comes_from_the_ledger(tmp_path):
    from evals.cost import cost_at, join_costs
    from shards.ledger import append_record

    run = tmp_path / "run"
    recs = [{"job": "features", "device_hours": 0.5, "energy_kwh": 0.2, "kg_co2e": 0.1},
            {"job": "train", "rank": 0, "steps": 100, "device_hours": 1.0, "energy_kwh": 0.4, "kg_co2e": 0.2},
            {"job": "train", "rank": 1, "steps": 100, "device_hours": 1.0, "energy_kwh": 0.4, "kg_co2e": 0.2},
            {"job": "train", "rank": 0, "status": "interrupted", "device_hours": 0.25, "energy_kwh": 0.1, "kg_co2e": 0.05},
            {"job": "train", "rank": 0, "steps": 200, "device_hours": 4.0, "energy_kwh": 1.6, "kg_co2e": 0.8}]  # fmt: skip
    for r in recs:
        append_record(run, r)
    assert cost_at(recs, 50)["device_hours"] == pytest.approx(1.0)  # half of each rank's first run
    at200 = cost_at(recs, 200)
    assert at200["device_hours"] == pytest.approx(2 + 0.25 + 2.0) and at200["energy_kwh"] == pytest.approx(0.8 + 0.1 + 0.8)
    assert at200["other"]["device_hours"] == 0.5 and cost_at(recs, 300)["kg_co2e"] == pytest.approx(0.4 + 0.05 + 0.8)
    (run / "checkpoints" / "step-200").mkdir(parents=True)
    cks = [{"step": 50}, {"step": 200}]
    assert join_costs(run / "checkpoints" / "step-200", cks) == str(run / "ledger.jsonl")
    assert [c["cost"]["device_hours"] for c in cks] == pytest.approx([1.0, 4.25])


def test_preference_model_given_as_a_directory_loads_and_scores(tmp_path):
    from PIL import Image

    from evals.preference import PreferenceScorer, load_preference, score_folder
    from tiny.clip import build_tiny_clip, save_clip

    model = save_clip(*build_tiny_clip(["a red circle", "a blue square"]), tmp_path / "pref")
    scorer = load_preference(str(model), "cpu")  # a CLIPModel folder: not ImageReward (tests/test_imagereward.py)
    assert isinstance(scorer, PreferenceScorer)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    scores = scorer.score(images, ["a red circle", "a blue square"])
    assert scores.shape == (2,) and abs(scores).max() <= scorer.scale + 1e-4
    assert scores.tolist() == pytest.approx(scorer.score(images, ["a red circle", "a blue square"]).tolist())
    prompts = [{"id": "a", "prompt": "a red circle"}, {"id": "b", "prompt": "a blue square"}]
    for p, im in zip(prompts, images):
        im.save(tmp_path / f"{p['id']}.png")
    mean = score_folder(scorer, prompts, tmp_path)
    assert mean == pytest.approx(float(scores.mean()), abs=1e-4)
    assert json.loads((tmp_path / "preference.json").read_text()) == {str(model): mean}


def test_unreachable_preference_model_is_one_line(tmp_path, monkeypatch):
    from evals.preference import PreferenceScorer
    from shards.errors import UserError

    with pytest.raises(UserError, match="--preference") as e:
        PreferenceScorer(str(tmp_path / "no-such-model"), "cpu")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_eval_suite_geneval_end_to_end_with_preference_and_cost(world_models, tmp_path):
    """`eval --suite geneval --limit 1` on a 2-checkpoint tiny PixArt run: samples, judge shards (the
    VLM's for colour, a tiny OWLv2's for presence, count and position), per-category results,
    preference scores (a tiny CLIP and a tiny ImageReward), costs from the run's ledger, the figure; a rerun samples and judges nothing new."""
    from demo.judge_vlm import IMAGE_SIZE, VISION_HIDDEN, corpus
    from evals.cost import cost_at, read_ledger
    from evals.suite import SuiteConfig, run_suite
    from t2i.stage import run_stage
    from t2i.train import TrainConfig
    from tiny.alignment import write_world_shards
    from tiny.clip import build_tiny_clip, save_clip
    from tiny.imagereward import build_tiny_imagereward
    from tiny.llava import build_tiny_llava
    from tiny.owl import build_tiny_owlv2

    torch.set_num_threads(1)
    judge = build_tiny_llava(tmp_path / "judge", corpus=corpus(), image_size=IMAGE_SIZE, seed=0, vision_hidden=VISION_HIDDEN)
    pref = save_clip(*build_tiny_clip(["a photo of a bench"]), tmp_path / "pref")
    reward = build_tiny_imagereward(tmp_path / "imagereward", [p["prompt"] for p in P.load_public("geneval", limit=1)])
    owl = build_tiny_owlv2(tmp_path / "owl", [p["prompt"] for p in P.load_public("geneval", limit=1)])
    write_world_shards(tmp_path / "captions", 200)
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae=world_models["vae"], text_encoder=world_models["text_encoder"],
                      max_tokens=40, text_dtype="float32", batch_size=8, steps=2, checkpoint_every=1, loader_workers=0)  # fmt: skip
    run_stage(cfg, tmp_path / "run", shards=tmp_path / "captions", progress=False)
    scfg = SuiteConfig(suite="geneval", limit=1, out=tmp_path / "eval", judge=str(judge), steps=2,
                       batch_size=8, preference=[str(pref), str(reward)], detector=str(owl), progress=False)  # fmt: skip
    report = run_suite(tmp_path / "run", scfg)
    cks = report["checkpoints"]
    assert len(cks) == 2 and report["prompts"] == 6
    for ck in cks:
        assert set(ck["drawn"]) == set(GENEVAL_COUNTS) and 0 <= ck["overall"] <= 1
        assert ck["judged"] == sum(len(p["questions"]) for p in P.load_public("geneval", limit=1))
        assert isinstance(ck["preference"][str(pref)], float) and isinstance(ck["preference"][str(reward)], float)
    from evals.judge_job import read_judged

    vlm, det = (read_judged(tmp_path / "eval" / "step-0000002" / d) for d in ("judged-geneval", "detected-geneval"))
    assert {r["category"].split("/")[1] for r in vlm} == {"color"} and {r["backend"] for r in det} == {"detector"}
    assert {r["category"].split("/")[1] for r in det} == {"object", "count", "position"} and len(vlm) + len(det) == cks[1]["judged"]
    ledger = read_ledger(Path(report["cost_ledger"]))
    assert [c["cost"] for c in cks] == [cost_at(ledger, c["step"]) for c in cks] and cks[1]["cost"]["device_hours"] > 0
    html = (tmp_path / "eval" / "eval.html").read_text()
    assert html.count("class='bar'") >= 2 * 6 and "quality_cost.png" in html and (tmp_path / "eval" / "quality_cost.png").is_file()
    again = run_suite(tmp_path / "run", scfg)
    assert [c["newly_judged"] for c in again["checkpoints"]] == [0, 0]
    assert [c["drawn"] for c in again["checkpoints"]] == [c["drawn"] for c in cks]


def test_geneval_detector_rules_on_boxes():
    """GenEval's checks on given boxes: counts against include/exclude, relative position with its margin."""
    from evals.detect import class_of, geneval_answers, relative_position

    assert class_of("dog", ["dog", "hot dog"]) == "dog" and class_of("a photo of a hot dog", ["dog", "hot dog"]) == "hot dog"
    assert class_of("a photo", ["dog"]) is None

    assert relative_position([0, 0, 10, 10], [20, 0, 30, 10]) == {"left of"}
    assert relative_position([0, 30, 10, 40], [0, 0, 10, 10]) == {"below"}
    assert relative_position([0, 0, 10, 10], [1, 1, 11, 11]) == set(), "within the margin: no relation"
    two = {"prompt": "a photo of two clocks", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    box = lambda x: [x, 0, x + 5, 5]  # noqa: E731
    assert geneval_answers(two, {"clock": [(0.9, box(0)), (0.5, box(10))]}) == [(True, 0.5)]
    assert geneval_answers(two, {"clock": [(0.9, box(0)), (0.5, box(10)), (0.4, box(20))]})[0][0] is False
    assert geneval_answers(two, {"clock": [(0.9, box(0))]}) == [(False, 0.0)]
    pos = {"prompt": "a photo of a dog right of a teddy bear", "include": [
        {"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0], "color": "red"}]}
    right = geneval_answers(pos, {"teddy bear": [(0.8, box(0))], "dog": [(0.7, box(30))]})
    assert right == [(True, 0.8), (True, 0.7), None, (True, 1.0)]  # colour: the VLM's
    assert geneval_answers(pos, {"teddy bear": [(0.8, box(30))], "dog": [(0.7, box(0))]})[3] == (False, 0.0)
    assert geneval_answers(pos, {"dog": [(0.7, box(30))]})[3] == (False, 0.0), "no target"


def test_tiny_owlv2_directory_loads_and_answers_judge_records(tmp_path):
    from PIL import Image

    from evals.detect import DetectorScorer
    from evals.public import detector_records
    from tiny.owl import build_tiny_owlv2

    prompts = [p for p in P.load_public("geneval") if p["category"] in ("position", "counting")][:1]
    prompts += [p for p in P.load_public("geneval") if p["category"] == "counting"][:1]
    det = DetectorScorer(str(build_tiny_owlv2(tmp_path / "owl", [p["prompt"] for p in prompts])), "cpu", threshold=0.0)
    image = Image.new("RGB", (40, 30), "red")
    found = det.detect(image, ["dog", "teddy bear"])
    assert found and set(found) <= {"dog", "teddy bear"} and all(0 <= s <= 1 and len(b) == 4 for v in found.values() for s, b in v)
    records = detector_records(prompts, tmp_path)
    assert {r["category"].split("/")[1] for r in records} <= {"object", "count", "position"} and records
    verdicts = det.score_records([image] * len(records), records)
    assert len(verdicts) == len(records) and all(v.answer in ("yes", "no") and 0 <= v.p_yes <= 1 for v in verdicts)
    assert [v.answer for v in det.score_records([image] * len(records), records)] == [v.answer for v in verdicts]
