"""The `watermark` and `text` scorers (issue 34) on the demo world's photos with 20% synthetic
overlays (tiny.overlays), with tiny models the project trains itself: precision and recall of
each at least 90% on held-out photos, through `score` itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from shards.reader import complete_shards
from tiny.curate_world import write_caption_shards
from tiny.overlays import overlay_world

pytestmark = pytest.mark.slow  # fits a watermark head on rendered photos (about 45 s): the full suite runs it


def _overlay_captions(root: Path, n: int, kind: str, seed: int) -> tuple[Path, dict[str, bool]]:
    """Caption shards of `n` world photos (test split), 20% with an overlay of `kind`; {key: overlaid}."""
    truth = overlay_world(root / "world", n=n, kind=kind, fraction=0.2, seed=seed, split="heldout")
    write_caption_shards(root / "world", root / "captions", {})
    return root / "captions", {k: o.kind == kind for k, o in truth.items()}


def _precision_recall(predicted: dict[str, bool], truth: dict[str, bool]) -> tuple[float, float]:
    tp = sum(predicted[k] and truth[k] for k in predicted)
    return tp / max(1, sum(predicted.values())), tp / max(1, sum(truth[k] for k in predicted))


def _scores(directory: Path) -> pl.DataFrame:
    return pl.read_parquet([str(p) for p in complete_shards(directory)]).filter(pl.col("error").is_null())


@pytest.fixture(scope="module")
def watermark_clip(tmp_path_factory) -> Path:
    from tiny.clip import train_world_clip

    return train_world_clip(tmp_path_factory.mktemp("wmclip") / "clip", n=600, seed=0, watermarks=0.3)


def test_watermark_head_fitted_on_labels_finds_held_out_watermarks(watermark_clip, tmp_path):
    from curate.api import ScoreConfig, run_score

    captions, truth = _overlay_captions(tmp_path, 400, "watermark", seed=5)
    keys = sorted(truth)
    labelled = keys[::2]  # fit on half, judge on the other half
    pq.write_table(pl.DataFrame({"key": labelled, "label": [int(truth[k]) for k in labelled]}).to_arrow(), tmp_path / "labels.parquet")
    s = run_score(ScoreConfig(shards=captions, out=tmp_path / "scores", scorers="watermark", clip_model=str(watermark_clip),
                              fit_watermark=tmp_path / "labels.parquet", progress=False))  # fmt: skip
    assert (tmp_path / "scores" / "watermark-head.safetensors").is_file() and "watermark" in s.scorer_seconds
    got = _scores(tmp_path / "scores")
    held = {k: v > 0.5 for k, v in got.select("key", "watermark").iter_rows() if k not in set(labelled)}
    precision, recall = _precision_recall(held, truth)
    print(f"watermark: precision {precision:.3f}, recall {recall:.3f} on {len(held)} held-out photos "
          f"({sum(truth[k] for k in held)} watermarked)")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # the saved head, loaded by --watermark-weights, scores as the fitted one did
    again = run_score(ScoreConfig(shards=captions, out=tmp_path / "again", scorers="watermark", clip_model=str(watermark_clip),
                                  watermark_weights=str(tmp_path / "scores" / "watermark-head.safetensors"), progress=False))  # fmt: skip
    assert again.scored == s.scored
    np.testing.assert_allclose(_scores(tmp_path / "again").sort("key")["watermark"].to_numpy(), got.sort("key")["watermark"].to_numpy(), atol=1e-6)
