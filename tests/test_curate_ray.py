"""`t2i-data score --engine ray`: the same per-batch function in Ray Data tasks, the same rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tiny.curate_world import make_world
from shards.reader import complete_shards

pytest.importorskip("ray")


def _frame(directory) -> pl.DataFrame:
    return pl.read_parquet([str(p) for p in complete_shards(directory)]).sort("key")


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_rows_and_resumes(tmp_path):
    from curate.api import ScoreConfig, run_score

    _, captions, truth = make_world(tmp_path, n=24, dup_keys=2)
    base = dict(shards=captions, scorers="dedup,lang,image", clip_model=str(_clip(tmp_path)), progress=False, shard_size=10)
    local = run_score(ScoreConfig(out=tmp_path / "local", **base))
    ray = run_score(ScoreConfig(out=tmp_path / "ray", engine="ray", replicas=2, batch_size=8, **base))
    assert (ray.scored, ray.failed) == (local.scored, local.failed) == (len(truth), 2)
    a, b = _frame(tmp_path / "local"), _frame(tmp_path / "ray")
    assert a["key"].to_list() == b["key"].to_list()
    for column in ("error", "lang", "content_sha256", "width", "jpeg_quality", "file_bytes"):
        assert a[column].to_list() == b[column].to_list(), column
    np.testing.assert_allclose(np.array(a["clip_image_emb"].drop_nulls().to_list()), np.array(b["clip_image_emb"].drop_nulls().to_list()), atol=1e-5)
    assert _frame(tmp_path / "local" / "dedup").equals(_frame(tmp_path / "ray" / "dedup"))
    again = run_score(ScoreConfig(out=tmp_path / "ray", engine="ray", **base))
    assert (again.scored, again.failed, again.skipped) == (0, 0, len(truth) + 2)
    assert _frame(tmp_path / "ray").height == len(truth) + 2


def _clip(tmp_path):
    """A tiny CLIP, untrained: the engines must agree whatever the weights."""
    from tiny.clip import build_tiny_clip, save_clip

    return save_clip(*build_tiny_clip(["a red circle"]), tmp_path / "clip")


@pytest.mark.slow
def test_ray_engine_scores_the_new_scorers_as_the_local_engine(tmp_path):
    """watermark, phash and the per-field caption scores: the same per-batch function
    (curate.scorers.score_batch) on both engines, so the same values, and the same pHash groups."""
    from curate.api import ScoreConfig, run_score
    from curate.watermark import WatermarkHead, save_watermark_head

    _, captions, truth = make_world(tmp_path, n=16, dup_keys=2)
    clip = _clip(tmp_path)
    save_watermark_head(WatermarkHead(48), tmp_path / "wm.safetensors")  # untrained: the engines must agree whatever the weights
    base = dict(shards=captions, scorers="watermark,phash,captions", clip_model=str(clip), watermark_weights=str(tmp_path / "wm.safetensors"),
                progress=False, shard_size=10)  # fmt: skip
    local = run_score(ScoreConfig(out=tmp_path / "local", **base))
    ray = run_score(ScoreConfig(out=tmp_path / "ray", engine="ray", replicas=2, batch_size=8, **base))
    assert (ray.scored, ray.failed) == (local.scored, local.failed) == (len(truth), 2)
    assert {"watermark", "phash", "captions"} <= set(ray.scorer_seconds) and set(ray.scorer_seconds) == set(local.scorer_seconds)
    a, b = _frame(tmp_path / "local"), _frame(tmp_path / "ray")
    assert a["key"].to_list() == b["key"].to_list() and a["phash"].to_list() == b["phash"].to_list()
    for column in ("watermark", "clip_score_caption"):
        np.testing.assert_allclose(a[column].to_numpy().astype(float), b[column].to_numpy().astype(float), atol=1e-5, equal_nan=True)
    assert _frame(tmp_path / "local" / "phash").equals(_frame(tmp_path / "ray" / "phash"))
