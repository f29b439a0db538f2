"""Caption fields drawn by how well they match their image (issue 34, Sana-style): the trainer's
per-sample draw follows softmax(score / T) over the fields passing the threshold, over many
epochs; it is the same after a resume; bad settings are one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shards import ShardWriter
from shards.errors import UserError
from test_t2i_caption_fields import ERRORED, FIELDS, NO_SHORT, N_ROWS, tiny_cfg, world  # noqa: F401 - the fixture

T = 3.0


def write_caption_scores(out: Path, seed: int = 0) -> dict[str, tuple[float, float | None]]:
    """A score directory with clip_score_caption and clip_score_caption_short per key (cosines
    0.20-0.34; none for the rows without a short caption), as `score --scorers captions` writes."""
    from curate.scorers import score_schema

    rng = np.random.default_rng(seed)
    w, scores = ShardWriter(out, schema=score_schema(["captions"]), rows_per_shard=30), {}
    for i in range(N_ROWS):
        a, b = (float(np.float32(v)) for v in rng.uniform(0.20, 0.34, 2))
        scores[f"k{i:03d}"] = (a, None if i in NO_SHORT else b)
        w.add({"key": f"k{i:03d}", "clip_score_caption": a, "clip_score_caption_short": scores[f"k{i:03d}"][1]})
    w.close()
    return scores


def expected_short(a: float, b: float | None, threshold: float | None) -> float:
    """P(caption_short) by softmax(100 cos / T) over the fields at or above the threshold (none: the best)."""
    if b is None:
        return 0.0
    s = np.array([a, b]) * 100
    ok = s >= threshold if threshold is not None else np.ones(2, bool)
    if not ok.any():
        return float(b > a)
    e = np.where(ok, np.exp((s - s.max()) / T), 0.0)
    return float(e[1] / e.sum())


@pytest.mark.parametrize("threshold", [None, 27.0])
def test_draws_follow_the_softmax_of_the_scores_over_many_epochs(world, tmp_path, threshold):  # noqa: F811
    from t2i.caption_scores import CaptionScoring
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    scores = write_caption_scores(tmp_path / "scores")
    ds = StreamingFeatureDataset(world["features"], 16, FIELDS, (3, 1), scoring=CaptionScoring(tmp_path / "scores", T, threshold))
    epochs = 2000
    idx = np.arange(len(ds))
    short = np.zeros(len(idx))
    for epoch in range(epochs):
        short += ds.pick_fields(idx, seed=3, epoch=epoch) == 1
    by_key = _keys_in_index_order(ds)
    want = np.array([expected_short(*scores[k], threshold) for k in by_key])
    got = short / epochs
    assert np.abs(got - want).max() < 0.045, np.abs(got - want).max()  # ~4 sigma at 2000 draws
    assert abs(got.sum() - want.sum()) / want.sum() < 0.02, (got.sum(), want.sum())
    assert all(got[i] == 0 for i, k in enumerate(by_key) if scores[k][1] is None)
    if threshold is not None:  # a field below the threshold is never drawn, unless it is the best of none passing
        for i, k in enumerate(by_key):
            a, b = scores[k]
            if b is not None and b * 100 < threshold <= a * 100:
                assert got[i] == 0
            if b is not None and a * 100 < threshold <= b * 100:
                assert got[i] == 1
    # the loader trains each sample on the field pick_fields names
    for b in list(make_loader(ds, 0, 5, 16, workers=0, epochs=2)):
        at = {k: i for i, k in enumerate(by_key)}
        assert [FIELDS.index(f) for f in b.caption_fields] == ds.pick_fields(np.array([at[k] for k in b.keys]), 5, b.epoch).tolist()


def _keys_in_index_order(ds) -> list[str]:
    """The features' keys in the index's order (sample i = the i-th key by the index's sort)."""
    from test_t2i_caption_fields import feature_rows
    from shards.hashing import column_hashes

    import pyarrow as pa

    names = sorted(feature_rows(ds.features_dir))
    hashes = column_hashes(pa.array(names, pa.string()))
    at = {int(h): k for h, k in zip(hashes, names)}
    from t2i.feature_index import open_index

    return [at[int(h)] for h in open_index(ds.features_dir, ds.shards, ds.caption_fields)["key_hash"]]


def test_resume_with_caption_scores_is_exact(world, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from t2i.train import train

    write_caption_scores(tmp_path / "scores")
    kw = dict(caption_scores=str(tmp_path / "scores"), caption_score_temperature=T, caption_score_threshold=25.0)
    full = train(tiny_cfg(world, trace_keys=True, **kw), tmp_path / "full", features=world["features"], progress=False)
    part = train(tiny_cfg(world, trace_keys=True, **kw), tmp_path / "part", features=world["features"], stop_after=3, progress=False)
    resumed = train(tiny_cfg(world, trace_keys=True, **kw), tmp_path / "part", features=world["features"], resume=True, progress=False)
    assert part["step"] == 3 and resumed["start_step"] == 3 and resumed["step"] == full["step"] == 10
    a, b = ([json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()] for run in (tmp_path / "full", tmp_path / "part"))
    assert len(a) == 10 and a == b
    trace = [[json.loads(x).get("caption_fields") for x in (run / "trace" / "rank-0.jsonl").read_text().splitlines()]
             for run in (tmp_path / "full", tmp_path / "part")]  # fmt: skip
    assert trace[0][-7:] == trace[1][-7:] and Counter(f for fs in trace[0] for f in fs or [])["caption_short"] > 0
    wa, wb = (load_file(Path(r["checkpoint"]) / "ema.safetensors") for r in (full, resumed))
    assert all((wa[k] == wb[k]).all() for k in wa)
    with pytest.raises(UserError, match="caption_score_temperature"):  # another draw on resume: one line
        train(tiny_cfg(world, steps=12, **{**kw, "caption_score_temperature": 1.0}), tmp_path / "part", features=world["features"],
              resume=True, progress=False)  # fmt: skip


@pytest.mark.parametrize("kw, message", [
    ({"caption_score_temperature": 0.0}, "caption_score_temperature 0.0 must be a positive number"),
    ({"caption_score_temperature": float("nan")}, "caption_score_temperature nan must be a positive number"),
    ({"caption_score_threshold": float("nan")}, "caption_score_threshold nan is not a number"),
])  # fmt: skip
def test_bad_caption_score_settings_are_one_line(world, tmp_path, kw, message):  # noqa: F811
    with pytest.raises(UserError, match=message) as e:
        tiny_cfg(world, caption_scores=str(tmp_path), **kw).validate()
    assert "\n" not in str(e.value)


def test_scores_without_the_caption_columns_are_one_line(world, tmp_path):  # noqa: F811
    from shards import ShardError
    from t2i.caption_scores import CaptionScoring
    from t2i.data import StreamingFeatureDataset
    from curate.scorers import score_schema

    w = ShardWriter(tmp_path / "scores", schema=score_schema(["lang"]))
    w.add({"key": "k000", "lang": "en", "lang_prob": 1.0})
    w.close()
    with pytest.raises(ShardError, match="has no column clip_score_caption, clip_score_caption_short: score the captions") as e:
        StreamingFeatureDataset(world["features"], 16, FIELDS, scoring=CaptionScoring(tmp_path / "scores"))
    assert "\n" not in str(e.value)
