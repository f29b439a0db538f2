"""The `captions` scorer (issue 34): a CLIP score per caption field, long captions scored in
overlapping windows of the text encoder's 77 tokens, so a wrong colour word after token 77 lowers
the score, where the truncated score cannot see it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from shards import ShardWriter, complete_shards

pytestmark = pytest.mark.slow  # fits tiny models in its fixtures (about a minute): the full suite runs it


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    from tiny.clip import train_long_caption_clip

    return train_long_caption_clip(tmp_path_factory.mktemp("longclip") / "clip", n=600, seed=0)


def _tokens(text: str) -> list[re.Match]:
    return list(re.finditer(r"\w+|[^\w\s]", text))


def test_windows_overlap_and_cover_the_whole_caption(long_clip):
    from shards.models.clip import ClipEmbedder
    from tiny.clip import long_caption
    from tiny.world import sample_scenes

    clip = ClipEmbedder(str(long_clip), device="cpu")
    text = long_caption(sample_scenes(1, 2, "heldout")[0], np.random.default_rng(0), tokens=220)
    pieces = clip.windows(text)
    sizes = [len(clip.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    assert len(pieces) >= 5 and max(sizes) == 75 and all(n == 75 for n in sizes)  # 77 less the start and end tokens
    at = [text.find(p) for p in pieces]
    assert at[0] == 0 and text.endswith(pieces[-1]) and all(a < b < a + len(p) for a, b, p in zip(at, at[1:], pieces))  # overlapping
    assert clip.windows("a red circle") == ["a red circle"]


def test_windowed_score_catches_a_wrong_colour_after_token_77_the_truncated_score_misses(long_clip):
    from shards.models.clip import ClipEmbedder
    from tiny.clip import long_caption, wrong_colour
    from tiny.world import render, sample_scenes

    clip = ClipEmbedder(str(long_clip), device="cpu")
    rng = np.random.default_rng(5)
    scenes = sample_scenes(60, 11, "heldout")
    good = [long_caption(s, rng, tokens=110) for s in scenes]
    bad = []
    for s, t in zip(scenes, good):
        at = _tokens(t)[80].start()  # after the 77-token window (75 text tokens + start and end)
        bad.append(wrong_colour(t, s, rng, after=at))
    assert all(len(_tokens(t)) > 100 for t in good) and all(g[: _tokens(g)[80].start()] == b[: _tokens(g)[80].start()] for g, b in zip(good, bad))
    img = clip.embed_images([render(s, 64) for s in scenes])
    truncated = [np.einsum("nd,nd->n", img, clip.embed_texts(t)) for t in (good, bad)]
    assert np.allclose(truncated[0], truncated[1], atol=1e-6)  # the truncated score cannot tell them apart
    windowed = [clip.window_scores(img, t) for t in (good, bad)]
    caught = float((windowed[0] > windowed[1]).mean())
    assert caught >= 0.9, caught


def test_score_captions_writes_a_windowed_score_per_field(long_clip, tmp_path):
    from curate.api import ScoreConfig, run_score
    from shards.models.clip import ClipEmbedder
    from tiny.clip import long_caption
    from tiny.world import render, sample_scenes

    rng = np.random.default_rng(3)
    w = ShardWriter(tmp_path / "captions", rows_per_shard=10)
    texts = {}
    for i, s in enumerate(sample_scenes(12, 4, "heldout")):
        render(s, 64).save(tmp_path / f"{i}.png")
        texts[f"k{i}"] = (long_caption(s, rng, tokens=120), f"a {s.color} {s.shape}", None if i % 3 else "a photo")
        w.add({"key": f"k{i}", "source": str(tmp_path / f"{i}.png"), "caption": texts[f"k{i}"][0], "caption_short": texts[f"k{i}"][1],
               "alt_text": texts[f"k{i}"][2]})  # fmt: skip
    w.close()
    s = run_score(ScoreConfig(shards=tmp_path / "captions", out=tmp_path / "scores", scorers="captions", clip_model=str(long_clip),
                              progress=False, batch_size=5))  # fmt: skip
    got = pl.read_parquet([str(p) for p in complete_shards(tmp_path / "scores")]).sort("key")
    assert s.scored == 12 and "captions" in s.scorer_seconds
    clip = ClipEmbedder(str(long_clip), device="cpu")
    img = np.stack(got["clip_image_emb"].to_list()).astype(np.float32)
    keys = got["key"].to_list()
    for j, column in enumerate(("clip_score_caption", "clip_score_caption_short", "clip_score_alt_text")):
        want = [texts[k][j] for k in keys]
        have = [i for i, t in enumerate(want) if t]
        np.testing.assert_allclose(got[column].to_numpy()[have], clip.window_scores(img[have], [want[i] for i in have]), atol=1e-5)
        assert got[column].null_count() == len(keys) - len(have)
