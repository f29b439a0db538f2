"""The `text` scorer (issue 34, curate.text): the share of an image in text, whether it has text,
and what it says (with a recogniser). The tiny detector the project fits itself
(tiny.text_detector) finds held-out text overlays on the demo world's photos with precision and
recall of at least 90%; the mechanics (columns, ledger, determinism, one-line errors) on
untrained detectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from shards.reader import complete_shards
from tiny.curate_world import write_caption_shards
from tiny.overlays import HELDOUT_WORDS, TRAIN_WORDS, overlay_world


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text_world(root: Path, n: int, seed: int, fraction: float = 0.2) -> tuple[Path, dict]:
    """Caption shards of `n` held-out world photos, `fraction` with text of HELDOUT_WORDS; {key: Overlay}."""
    truth = overlay_world(root / "world", n=n, kind="text", fraction=fraction, seed=seed, split="heldout", words=HELDOUT_WORDS)
    write_caption_shards(root / "world", root / "captions", {})
    return root / "captions", truth


def _scores(directory: Path) -> pl.DataFrame:
    return pl.read_parquet([str(p) for p in complete_shards(directory)]).filter(pl.col("error").is_null())


def _untrained(path: Path) -> Path:
    from curate.text import TextNet, save_text_detector

    import torch

    torch.manual_seed(0)
    return Path(save_text_detector(TextNet(64), path))


@pytest.mark.slow  # fits the tiny detector (1,600 photos, 600 steps: about a minute on one idle core)
def test_tiny_detector_finds_held_out_text_overlays(tmp_path):
    from curate.api import ScoreConfig, run_score
    from tiny.text_detector import train_text_detector

    assert not set(HELDOUT_WORDS) & set(TRAIN_WORDS)
    detector = train_text_detector(tmp_path / "text-detector.safetensors")
    assert detector.stat().st_size < 1_000_000
    captions, truth = _text_world(tmp_path, 500, seed=5)
    s = run_score(ScoreConfig(shards=captions, out=tmp_path / "scores", scorers="text", text_detector=str(detector), progress=False))
    assert s.scored == 500 and "text" in s.ledger["scorer_seconds"]
    got = _scores(tmp_path / "scores")
    found = dict(got.select("key", "has_text").iter_rows())
    has = {k: o.kind == "text" for k, o in truth.items()}
    tp = sum(found[k] and has[k] for k in found)
    precision, recall = tp / max(1, sum(found.values())), tp / sum(has.values())
    print(f"text: precision {precision:.3f}, recall {recall:.3f} on {len(found)} held-out photos ({sum(has.values())} with text)")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # coverage: the detected share of the image follows the drawn boxes' share
    coverage = dict(got.select("key", "text_coverage").iter_rows())
    drawn = {k: sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in o.boxes) / 64**2 for k, o in truth.items() if o.kind == "text"}
    keys = sorted(drawn)
    r = np.corrcoef([coverage[k] for k in keys], [drawn[k] for k in keys])[0, 1]
    print(f"text coverage: correlation {r:.3f} with the drawn boxes' share over {len(keys)} photos with text")
    assert r > 0.7, r
    assert got["text"].null_count() == got.height  # no recogniser: no text


def test_fit_is_deterministic_and_the_scorer_writes_its_columns(tmp_path):
    """Same seed, same weights; the scorer's columns (has_text = coverage >= the minimum) and its
    seconds in the run's ledger, on an untrained detector (the mechanics)."""
    from curate.api import ScoreConfig, run_score
    from curate.text import TextNet, fit_text_detector
    from tiny.overlays import text_mask
    from tiny.text_detector import text_samples

    images, truth = text_samples(16, seed=3)
    pixels = TextNet(64).pixels(images)
    masks = np.stack([text_mask(o, im.size) for im, o in zip(images, truth)])
    a, b = (fit_text_detector(pixels, masks, steps=3, batch=8, seed=1) for _ in range(2))
    assert all(np.array_equal(x.detach().numpy(), y.detach().numpy()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    captions, _ = _text_world(tmp_path, 12, seed=2, fraction=0.5)
    s = run_score(ScoreConfig(shards=captions, out=tmp_path / "scores", scorers="text,phash", text_detector=str(_untrained(tmp_path / "d.safetensors")),
                              text_min_coverage=0.3, progress=False))  # fmt: skip
    got = _scores(tmp_path / "scores")
    assert s.scored == 12 and {"text", "phash"} <= set(s.ledger["scorer_seconds"])
    assert got["has_text"].to_list() == [c >= 0.3 for c in got["text_coverage"].to_list()]
    assert all(0.0 <= c <= 1.0 for c in got["text_coverage"].to_list())


def test_text_regions_in_reading_order():
    from curate.text import text_regions

    cells = np.zeros((8, 8), bool)
    cells[5, 1:3] = True  # lower line
    cells[1, 4:7] = True  # upper line, right
    cells[1:3, 0] = True  # upper line, left
    assert text_regions(cells) == [(0.0, 0.125, 0.125, 0.375), (0.5, 0.125, 0.875, 0.25), (0.125, 0.625, 0.375, 0.75)]


@pytest.mark.parametrize("args, message", [
    (["--text-threshold", "0"], "error: --text-threshold 0.0 is out of range: pass a number in (0, 1)"),
    (["--text-threshold", "1"], "error: --text-threshold 1.0 is out of range"),
    (["--text-min-coverage", "0"], "error: --text-min-coverage 0.0 is out of range: pass a number in (0, 1]"),
    (["--text-min-coverage", "1.5"], "error: --text-min-coverage 1.5 is out of range"),
    ([], "error: the text scorer needs --text-detector FILE_DIR_OR_HF_ID"),
    (["--text-detector", "/nonexistent/det.safetensors"], "error: --text-detector /nonexistent/det.safetensors does not exist"),
    (["--text-detector", "BAD"], "error: --text-detector BAD is not a text detector file"),
    (["--text-detector", "JUNKDIR"], "holds no text-detector.safetensors and no config.json"),
])  # fmt: skip
def test_bad_text_settings_are_one_line(tmp_path, args, message):
    from typer.testing import CliRunner

    from cli import app

    captions, _ = _text_world(tmp_path, 2, seed=1)
    detector = _untrained(tmp_path / "d.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    if "--text-detector" not in args and args:
        args = [*args, "--text-detector", str(detector)]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("no model")
    args = [{"BAD": str(tmp_path / "bad.safetensors"), "JUNKDIR": str(tmp_path / "junk")}.get(a, a) for a in args]
    message = message.replace("BAD", str(tmp_path / "bad.safetensors"))
    res = CliRunner().invoke(app, ["score", "--shards", str(captions), "--out", str(tmp_path / "scores"), "--scorers", "text", *args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "scores").exists() or not list((tmp_path / "scores").glob("*.parquet"))


def test_recogniser_reads_the_detected_regions(tmp_path):
    """--text-recognizer: a transformers OCR folder (a tiny TrOCR layout, random weights: the
    mechanics) reads each image's text regions; no region, empty text; no recogniser, null."""
    from curate.api import ScoreConfig, run_score
    from tiny.ocr import build_tiny_trocr

    captions, _ = _text_world(tmp_path, 6, seed=4, fraction=0.5)
    detector, ocr = str(_untrained(tmp_path / "d.safetensors")), str(build_tiny_trocr(tmp_path / "trocr"))
    for out, threshold in (("all", 0.01), ("none", 0.99)):  # an untrained detector: every cell near 0.5
        run_score(ScoreConfig(shards=captions, out=tmp_path / out, scorers="text", text_detector=detector, text_recognizer=ocr,
                              text_threshold=threshold, progress=False))  # fmt: skip
    every, no = _scores(tmp_path / "all"), _scores(tmp_path / "none")
    assert every["text_coverage"].to_list() == [1.0] * 6 and every["has_text"].all()
    assert all(isinstance(t, str) and t for t in every["text"].to_list()), every["text"].to_list()
    assert no["text_coverage"].to_list() == [0.0] * 6 and not no["has_text"].any() and no["text"].to_list() == [""] * 6


@pytest.mark.slow
def test_ray_engine_scores_text_as_the_local_engine(tmp_path):
    pytest.importorskip("ray")
    from curate.api import ScoreConfig, run_score

    captions, truth = _text_world(tmp_path, 16, seed=6, fraction=0.5)
    base = dict(shards=captions, scorers="text", text_detector=str(_untrained(tmp_path / "d.safetensors")), text_min_coverage=0.4,
                progress=False, shard_size=10)  # fmt: skip
    local = run_score(ScoreConfig(out=tmp_path / "local", **base))
    ray = run_score(ScoreConfig(out=tmp_path / "ray", engine="ray", replicas=2, batch_size=4, **base))
    assert (ray.scored, ray.failed) == (local.scored, local.failed) == (16, 2) and "text" in ray.ledger["scorer_seconds"]
    a, b = _scores(tmp_path / "local").sort("key"), _scores(tmp_path / "ray").sort("key")
    assert a["key"].to_list() == b["key"].to_list() and a["has_text"].to_list() == b["has_text"].to_list()
    np.testing.assert_allclose(a["text_coverage"].to_numpy(), b["text_coverage"].to_numpy(), atol=1e-6)


def test_transformers_detector_folder_scores_through_its_probability_map(tmp_path):
    """--text-detector a transformers folder (a tiny PP-OCRv5 mobile detector, random weights:
    the mechanics): each image's map at its own size, the same in a batch as alone."""
    from curate.text import HFTextMap, TextReader
    from tiny.ocr import build_tiny_ppocr_detector
    from tiny.text_detector import text_samples

    folder = str(build_tiny_ppocr_detector(tmp_path / "det"))
    reader = TextReader(folder, threshold=0.5, min_coverage=0.05)
    assert isinstance(reader.net, HFTextMap)
    images, _ = text_samples(3, seed=1)
    images = [images[0], images[1].resize((96, 48)), images[2]]
    maps = reader.net.cell_probs(images)
    assert maps[1].shape != maps[0].shape and all(((m >= 0) & (m <= 1)).all() and m.std() > 0 for m in maps)
    for im, m in zip(images, maps):
        np.testing.assert_allclose(reader.net.cell_probs([im])[0], m, atol=1e-4)  # float sums in another order
    found = reader.read(images)
    assert [f.coverage for f in found] == [float((m >= 0.5).mean()) for m in maps] and all(f.text is None for f in found)
