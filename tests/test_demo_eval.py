"""The demo's eval stage: the judge VLM it ships, its agreement with the world's exact judge, and
a section headline that follows that agreement."""

import pytest
import torch
from PIL import Image

from demo.eval_report import eval_headline, eval_rows
from demo.eval_stage import agreement
from evals.questions import Combo, questions
from tiny import judge as J, world as W


def _rows(tmp_path, n=6):
    """Judge rows about n saved world renders: each image asked about its own scene and another's,
    in the split/wording/category form the own suite writes; relative image paths."""
    rows = []
    scenes = W.sample_scenes(2 * n, 11, "any")
    for i, (scene, other) in enumerate(zip(scenes[:n], scenes[n:])):
        W.render(scene, 32).save(tmp_path / f"{i}.png")
        for s in (scene, other):
            combo = Combo(s.shape, s.color, W._POSITION_PHRASE[s.position])
            for cat, q in questions(combo):
                rows.append({"key": f"{i}-{len(rows)}", "image": f"{i}.png", "question": q, "error": None,
                             "category": f"{'heldout' if i % 2 else 'seen'}/caption/{cat}"})
    return rows


def test_agreement_compares_each_answer_with_the_exact_reading(tmp_path):
    rows = _rows(tmp_path)
    truth = [J.answer_question(r["question"], J.judge_image(Image.open(tmp_path / r["image"]).convert("RGB"))) for r in rows]
    for i, (r, t) in enumerate(zip(rows, truth)):
        r["answer"] = ("yes" if t else "no") if i % 2 == 0 else ("no" if t else "yes")  # every other answer wrong
    rows.append({**rows[0], "key": "broken", "answer": None, "error": "decode failed"})  # errors are not judged
    got = agreement(rows, root=tmp_path)
    assert got["questions"] == len(truth) and got["images"] == 6
    assert got["agree"] == pytest.approx(0.5)
    assert set(got["by_category"]) == {f"{s}/{c}" for s in ("seen", "heldout") for c in ("object", "attribute", "relation", "combination")}
    assert got["exact_yes"] == pytest.approx(sum(truth) / len(truth)) and 0 < got["exact_yes"] < 1
    assert got["constant"] == pytest.approx(max(got["exact_yes"], 1 - got["exact_yes"]))
    for r in rows[:-1]:
        r["answer"] = "yes"
    always_yes = agreement(rows, root=tmp_path)
    assert always_yes["agree"] == pytest.approx(got["exact_yes"])  # always-yes agrees exactly on the true ones
    assert always_yes["balanced"] == pytest.approx(0.5)  # all of the true yes, none of the true no
    for r, t in zip(rows, truth):
        r["answer"] = "yes" if t else "no"
    assert agreement(rows, root=tmp_path)["balanced"] == pytest.approx(1.0)


def test_the_eval_headline_follows_the_agreement():
    """Shown only at >= 90% agreement that also beats always giving the commoner answer."""
    def ev(agree, constant=0.8):
        a = {"agree": agree, "constant": constant, "balanced": 0.75, "questions": 192, "images": 48, "vlm_yes": 0.3,
             "exact_yes": 0.2, "exact_questions": {"heldout/object": 0.25}}
        return {"c": {"prompts": 48, "questions": {"heldout/object": 0.5}, "drawn": {"heldout/caption": 0.125}, "agreement": a}}

    title, text = eval_headline(ev(0.93))
    assert title.endswith(": shown") and text.startswith("Shown:") and "93%" in text
    title, text = eval_headline(ev(0.70))
    assert title.endswith(": not shown") and text.startswith("Not shown:") and "70%" in text and "target 90%" in text
    assert eval_headline(ev(None))[0].endswith("not shown")
    # a judge saying no to everything on mostly-no truth reaches 90% without judging anything
    title, text = eval_headline(ev(0.91, constant=0.91))
    assert title.endswith(": not shown") and "commoner answer would agree 91%" in text
    row = eval_rows(ev(0.7))[0]
    assert row[0] == "(c)" and row[1] == "50% (25%)" and row[-4:] == ("12%", "70%", "80%", "75%")


@pytest.mark.slow
def test_the_shipped_judge_agrees_with_the_exact_judge_on_renders():
    """The judge the demo ships (`python -m demo.judge_vlm`) answers fresh renders' suite questions
    as the exact judge reads them, >= 90% (the recipe measured 91.9% on this set)."""
    from autolabel.backends import make_captioner
    from demo.judge_vlm import SHIPPED_JUDGE
    from evals.vqa import VqaScorer
    from test_evals import suite_images

    torch.set_num_threads(2)
    scorer = VqaScorer(make_captioner("transformers", str(SHIPPED_JUDGE)))
    pairs = suite_images(120, seed=99)
    said = [v.answer == "yes" for s in range(0, len(pairs), 32) for v in scorer.score([im for _, im in pairs[s : s + 32]], [q for q, _ in pairs[s : s + 32]])]
    exact = [J.answer_question(q, J.judge_image(im)) for q, im in pairs]
    assert sum(a == b for a, b in zip(said, exact)) / len(pairs) >= 0.90
