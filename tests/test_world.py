"""The synthetic world: deterministic, SA-1B-shaped on disk, and its checkers are accurate."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tiny import judge as J
from tiny import world as W


def _jpeg(img: Image.Image, quality: int = 92) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_sampling_and_rendering_are_deterministic():
    a, b = W.sample_scenes(20, seed=3), W.sample_scenes(20, seed=3)
    assert a == b
    assert W.sample_scenes(5, seed=3) == a[:5], "scene i must not depend on n"
    assert W.sample_scenes(20, seed=4) != a
    assert np.array_equal(np.asarray(W.render(a[0], 32)), np.asarray(W.render(a[0], 32)))
    assert W.render(a[0], 48).size == (48, 48)


def test_heldout_rule_holds_out_triples_not_pairs():
    triples = [(c, s, p) for c in W.COLORS for s in W.SHAPES for p in W.POSITIONS]
    held = [t for t in triples if W.is_heldout(*t)]
    assert 0 < len(held) < len(triples) // 4
    train = [t for t in triples if not W.is_heldout(*t)]
    # every pair of attributes still occurs in training
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert {(t[i], t[j]) for t in train} == {(t[i], t[j]) for t in triples}
    for s in W.sample_scenes(200, seed=0, split="heldout"):
        assert W.is_heldout(s.color, s.shape, s.position)
    for s in W.sample_scenes(200, seed=0, split="train"):
        assert not W.is_heldout(s.color, s.shape, s.position)
    with pytest.raises(ValueError):
        W.sample_scenes(1, seed=0, split="test")


def test_write_sam_folder_layout_and_determinism(tmp_path):
    scenes = W.write_sam_folder(tmp_path / "a", n=6, seed=1, image_size=40)
    W.write_sam_folder(tmp_path / "b", n=6, seed=1, image_size=40)
    held = W.write_sam_folder(tmp_path / "a", n=3, seed=1, image_size=40, split="heldout")

    a = tmp_path / "a"
    jpgs = sorted(p.name for p in a.glob("sa_*.jpg"))
    assert len(jpgs) == 9 and "sa_1.jpg" in jpgs and f"sa_{W.FIRST_ID['heldout']}.jpg" in jpgs
    info = json.loads((a / "sa_1.json").read_text())
    assert info["annotations"] == []
    alt1 = info["image"].pop("alt_text")
    assert info["image"] == {"image_id": 1, "width": 40, "height": 40, "file_name": "sa_1.jpg"}
    assert Image.open(a / "sa_1.jpg").size == (40, 40)
    for name in ("sa_1.jpg", "sa_6.json"):
        assert (a / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    # the latest split written owns the ground-truth files: here the held-out one
    alt = pq.read_table(a / "alt_texts.parquet").to_pylist()
    assert [r["key"] for r in alt] == [f"sa_{W.FIRST_ID['heldout'] + i}" for i in range(3)]
    truth = W.read_scenes(tmp_path / "b")
    assert [s for _, s in truth] == scenes
    rec = truth[0][0]
    assert rec["dense_caption"] == W.dense_caption(scenes[0]) and rec["file_name"] == "sa_1.jpg"
    assert isinstance(rec["alt_text"], str) and rec["alt_text"]
    assert json.loads((tmp_path / "b" / "sa_1.json").read_text())["image"]["alt_text"] == rec["alt_text"] == alt1
    assert all(W.is_heldout(s.color, s.shape, s.position) for s in held)


def test_alt_texts_are_noisy_and_usually_miss_the_object():
    rng = np.random.default_rng(0)
    scenes = W.sample_scenes(400, seed=2)
    alts = [W.alt_text(s, rng) for s in scenes]
    both = sum(s.color in a and s.shape in a for s, a in zip(scenes, alts))
    neither = sum(s.color not in a and s.shape not in a for s, a in zip(scenes, alts))
    assert 0.2 < both / 400 < 0.45 and 0.3 < neither / 400 < 0.6
    assert np.mean([len(a.split()) for a in alts]) < 4
    assert len(set(alts)) > 50


def test_dense_caption_parses_back_to_the_scene():
    for s in W.sample_scenes(200, seed=5, split="any"):
        got = J.parse_caption(W.dense_caption(s))
        assert got == {"color": s.color, "shape": s.shape, "position": s.position, "size": s.size}
        assert {k: v for k, v in J.parse_caption(W.prompt_text(s)).items()} == got
    assert J.parse_caption("Two big violet discs in the middle.") == {
        "color": "purple", "shape": "circle", "position": "center", "size": "large"}  # fmt: skip
    assert J.parse_caption("nice picture") == {"color": None, "shape": None, "position": None, "size": None}
    assert J.parse_caption(None)["color"] is None


def test_score_captions_counts_and_chance():
    scenes = W.sample_scenes(4, seed=0)
    captions = [W.dense_caption(scenes[0]), W.dense_caption(scenes[1]), "nothing here", W.dense_caption(scenes[0])]
    r = J.score_captions(list(zip(scenes, captions)))
    assert r["n"] == 4 and r["color"]["chance"] == pytest.approx(1 / 6) and r["position"]["chance"] == pytest.approx(1 / 5)
    assert r["all"]["correct"] >= 2 and r["all"]["correct"] <= 3


@pytest.mark.parametrize("size", [16, 32])
def test_judge_image_reads_clean_renders(size):
    scenes = W.sample_scenes(300, seed=11, split="any")
    r = J.score([(s, _jpeg(W.render(s, size))) for s in scenes])
    assert r["color"]["accuracy"] >= 0.95 and r["position"]["accuracy"] >= 0.95
    # measured (600 scenes): shape 0.99 at 32 px; at 16 px ~0.99 clean, ~0.87 after JPEG (a
    # small cross is ~5 px wide and JPEG blurs it into a disc)
    assert r["shape"]["accuracy"] >= (0.95 if size == 32 else 0.8)
    assert r["size"]["accuracy"] >= 0.95


def test_judge_image_large_renders_and_empty_images():
    s = W.Scene("blue", "triangle", "right", "large", "beige", "gradient", texture_seed=4)
    got = J.judge_image(W.render(s, 128))
    assert (got["color"], got["shape"], got["position"], got["size"]) == ("blue", "triangle", "right", "large")
    blank = Image.new("RGB", (16, 16), (200, 200, 200))
    assert J.judge_image(blank)["color"] is None
    # a wrong image scores as wrong
    other = W.Scene("red", "circle", "left", "large", "white", "plain")
    r = J.score([(s, W.render(other, 32))])
    assert r["color"]["correct"] == 0 and r["position"]["correct"] == 0 and r["shape"]["correct"] == 0


def test_meta_dir_keeps_the_image_folder_a_pure_sam_source(tmp_path):
    from tiny.world import read_scenes, write_sam_folder

    scenes = write_sam_folder(tmp_path / "sam", 5, seed=3, image_size=32, meta_dir=tmp_path / "truth")
    assert sorted(p.suffix for p in (tmp_path / "sam").iterdir()) == [".jpg"] * 5 + [".json"] * 5
    rows = read_scenes(tmp_path / "truth")
    assert [s for _, s in rows] == scenes
    for record, _ in rows:  # each record points at its image from the metadata folder
        assert (tmp_path / "truth" / record["image"]).resolve() == (tmp_path / "sam" / record["file_name"]).resolve()
