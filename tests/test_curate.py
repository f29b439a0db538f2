"""`t2i-data score` and `select` on the demo world, with a tiny CLIP the project trains itself."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tiny.curate_world import make_world
from tiny import world as W
from shards.reader import complete_shards, done_keys, iter_batches
from shards.schema import CAPTION_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    from tiny.clip import train_world_clip

    return train_world_clip(tmp_path_factory.mktemp("clip") / "clip", n=600, seed=0)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, clip_dir):
    """A world (40% low quality, planted copies, non-English captions, a broken and a missing
    image) as caption shards, scored with clip, dedup, lang and image."""
    from curate.api import ScoreConfig, run_score

    root = tmp_path_factory.mktemp("scored")
    world, captions, truth = make_world(root, n=120, distinct=True)
    summary = run_score(ScoreConfig(shards=captions, out=root / "scores", scorers="clip,dedup,lang,image",
                                    clip_model=str(clip_dir), progress=False, shard_size=40, batch_size=16))  # fmt: skip
    scores = pl.read_parquet([str(p) for p in complete_shards(root / "scores")])
    dedup = pl.read_parquet([str(p) for p in complete_shards(root / "scores" / "dedup")])
    return dict(root=root, world=world, captions=captions, truth=truth, summary=summary, scores=scores, dedup=dedup)


def _emb(frame: pl.DataFrame, column: str) -> np.ndarray:
    return np.array(frame[column].to_list(), np.float32)


@pytest.mark.slow
def test_clip_score_ranks_own_caption_above_a_shuffled_one(clip_dir):
    from shards.models.clip import ClipEmbedder, clip_scores
    from tiny.clip import world_caption

    clip = ClipEmbedder(str(clip_dir))
    scenes = W.sample_scenes(200, seed=5, split="heldout")  # triples the CLIP never saw
    images = clip.embed_images([W.render(s, 64) for s in scenes])
    texts = clip.embed_texts([world_caption(s) for s in scenes])
    own = clip_scores(images, texts)
    for shift in (1, 17, 73):
        shuffled = clip_scores(images, np.roll(texts, shift, axis=0))
        assert (own > shuffled).mean() >= 0.95


@pytest.mark.slow
def test_score_rows_keys_and_unreadable_images_are_recorded(scored):
    scores, truth = scored["scores"], scored["truth"]
    assert sorted(scores["key"].to_list()) == sorted([*truth, "broken", "missing"]), "one row per caption row"
    errors = dict(scores.filter(pl.col("error").is_not_null()).select("key", "error").iter_rows())
    assert set(errors) == {"broken", "missing"} and "unreadable source" in errors["missing"]
    assert scored["summary"].failed == 2 and scored["summary"].scored == len(truth)
    ok = scores.filter(pl.col("error").is_null())
    assert ok["clip_score"].null_count() == 0 and len(ok["clip_image_emb"][0]) > 0
    assert ok.filter(pl.col("key") == "sa_2000001")["width"].item() == 64
    quality = {k: t["quality"] for k, t in truth.items() if k.startswith("sa_") and "_" not in k[3:]}
    jpeg = dict(ok.select("key", "jpeg_quality").iter_rows())
    assert all(jpeg[k] == (W.LOW_QUALITY_JPEG if q == "low" else 92) for k, q in quality.items())
    blur = dict(ok.select("key", "blur").iter_rows())
    low = [blur[k] for k, q in quality.items() if q == "low"]
    high = [blur[k] for k, q in quality.items() if q == "high"]
    assert np.median(low) < np.median(high) / 2, "blurred (if grainy) images have a lower Laplacian variance"


def test_blur_and_jpeg_quality_estimates():
    import io

    from PIL import ImageFilter

    from curate.quality import jpeg_quality, laplacian_variance

    sharp = W.render(W.sample_scenes(1, seed=0)[0], 128)
    assert laplacian_variance(sharp.filter(ImageFilter.GaussianBlur(3))) < laplacian_variance(sharp) / 10
    for q in (12, 50, 75, 92):
        buf = io.BytesIO()
        sharp.save(buf, format="JPEG", quality=q)
        assert jpeg_quality(buf.getvalue()) == q
    buf = io.BytesIO()
    sharp.save(buf, format="PNG")
    assert jpeg_quality(buf.getvalue()) is None


@pytest.mark.slow
def test_language_id_flags_the_non_english_captions(scored):
    langs = dict(scored["scores"].select("key", "lang").iter_rows())
    for key, t in scored["truth"].items():
        assert langs[key] == t["lang"], key


@pytest.mark.slow
def test_near_duplicates_found_without_false_merges(scored):
    dedup, truth = scored["dedup"], scored["truth"]
    cluster = dict(dedup.select("key", "dup_cluster").iter_rows())
    copies = [k for k, t in truth.items() if t["original"] != k]
    found = sum(cluster[k] is not None and cluster[k] == cluster[truth[k]["original"]] for k in copies)
    assert found / len(copies) >= 0.95, f"recall {found}/{len(copies)}"
    members: dict[str, set] = {}
    for key, c in cluster.items():
        if c is not None and key in truth:
            members.setdefault(c, set()).add(truth[key]["original"])
    assert all(len(originals) == 1 for originals in members.values()), "a cluster merged distinct images"
    exact = dedup.filter(pl.col("exact_duplicate"))["key"].to_list()
    assert exact == [k for k in truth if k.endswith("_exact")]
    near = set(dedup.filter(pl.col("near_duplicate"))["key"].to_list())
    assert set(copies) - near == set() or len(set(copies) - near) <= 0.05 * len(copies)
    assert not near & {k for k, t in truth.items() if t["original"] == k}, "representatives are kept"


@pytest.mark.slow
def test_aesthetic_head_fitted_on_ratings_selects_the_high_quality_subset(tmp_path, clip_dir):
    from curate.api import ScoreConfig, run_score
    from curate.select import run_select

    world, captions, truth = make_world(tmp_path, n=300, seed=3, dup_keys=1, low_quality=0.4)
    originals = [k for k, t in truth.items() if t["original"] == k and k.startswith("sa_")]
    rated = originals[: len(originals) // 2]  # fit on half, judge on the other half
    pq.write_table(pl.DataFrame({"key": rated, "rating": [8.0 if truth[k]["quality"] == "high" else 3.0 for k in rated]}).to_arrow(),
                   tmp_path / "ratings.parquet")  # fmt: skip
    run_score(ScoreConfig(shards=captions, out=tmp_path / "scores", scorers="aesthetic", clip_model=str(clip_dir),
                          fit_aesthetic=tmp_path / "ratings.parquet", progress=False))  # fmt: skip
    assert (tmp_path / "scores" / "aesthetic-head.safetensors").is_file()
    run_select(captions, tmp_path / "scores", "aesthetic >= 5.5", tmp_path / "aesthetic")
    chosen = set(done_keys(tmp_path / "aesthetic")) & set(originals[len(rated):])
    held_high = {k for k in originals[len(rated):] if truth[k]["quality"] == "high"}
    precision = len(chosen & held_high) / max(len(chosen), 1)
    assert precision >= 0.9 and len(chosen & held_high) >= 0.5 * len(held_high), (precision, len(chosen), len(held_high))


def test_nsfw_model_loads_offline_and_scores(tmp_path):
    from curate.safety import NsfwDetector

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    scenes = W.sample_scenes(3, seed=0)
    results = NsfwDetector().score([W.render(s, 96) for s in scenes])
    assert len(results) == 3
    assert all(isinstance(s, float) and 0.0 <= s < 0.2 and labels == "" for s, labels in results), results


@pytest.mark.slow
def test_select_writes_caption_shards_and_reports_each_condition(scored, tmp_path):
    from curate.select import run_select

    where = "lang = 'en' and not near_duplicate and clip_score > 0.5"
    summary = run_select(scored["captions"], scored["root"] / "scores", where, tmp_path / "sel", shard_size=20)
    frame = scored["scores"].join(scored["dedup"], on="key", how="left")
    c1 = frame["lang"].fill_null("") == "en"
    c2 = ~frame["near_duplicate"].fill_null(True)
    c3 = frame["clip_score"].fill_null(-1) > 0.5
    expected = set(frame.filter(c1 & c2 & c3)["key"].to_list())
    assert summary.removed == [("lang = 'en'", int((~c1).sum())), ("not near_duplicate", int((c1 & ~c2).sum())),
                               ("clip_score > 0.5", int((c1 & c2 & ~c3).sum()))]  # fmt: skip
    assert all(n > 0 for _, n in summary.removed) and 0 < summary.kept == len(expected)
    rows = [r for b in iter_batches(tmp_path / "sel") for r in b.to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert pq.read_schema(complete_shards(tmp_path / "sel")[0]).names == CAPTION_SCHEMA.names
    assert all(r["caption"] for r in rows)


@pytest.mark.slow
def test_bad_where_is_one_line_naming_the_columns(scored, tmp_path):
    from cli import app

    for where in ("aesthetik >= 5", "clip_score >>= 1"):
        res = CliRunner().invoke(app, ["select", "--shards", str(scored["captions"]), "--scores", str(scored["root"] / "scores"),
                                       "--where", where, "--out", str(tmp_path / "x")])  # fmt: skip
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: bad --where") and "clip_score" in lines[0] and "near_duplicate" in lines[0]


def _keys(directory: Path) -> list[str]:
    return [k for b in iter_batches(directory, columns=["key"]) for k in b.column("key").to_pylist()]


@pytest.mark.slow
def test_score_resumes_after_kill_9_without_duplicates(scored, clip_dir, tmp_path):
    out = tmp_path / "scores"
    cmd = [PY, "cli.py", "score", "--shards", str(scored["captions"]), "--out", str(out), "--scorers", "clip,dedup,image",
           "--clip-model", str(clip_dir), "--batch-size", "2", "--shard-size", "4", "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("*.done"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: give it more work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _keys(out)
    assert 0 < len(partial) < len(scored["truth"])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"skipped as already done {len(partial)}" in done.stdout
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == len(scored["truth"]) + 2
    dedup = pl.read_parquet([str(p) for p in complete_shards(out / "dedup")])
    assert sorted(dedup["key"].to_list()) == sorted(keys), "the dedup pass covers every row once"


@pytest.mark.slow
def test_select_resumes_after_a_crash_without_duplicates(scored, tmp_path):
    from curate.select import run_select

    where = "clip_score > 0.5"
    full = run_select(scored["captions"], scored["root"] / "scores", where, tmp_path / "a", shard_size=10)
    out = tmp_path / "b"
    run_select(scored["captions"], scored["root"] / "scores", where, out, shard_size=10)
    shards = complete_shards(out)
    assert len(shards) >= 3
    # a crash as kill -9 leaves it: the last shards uncommitted (no marker), a temp file
    for shard in shards[-2:]:
        Path(str(shard) + ".done").unlink()
    (out / ".part-99999-deadbeef.parquet.tmp").write_bytes(b"partial")
    again = run_select(scored["captions"], scored["root"] / "scores", where, out, shard_size=10)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == full.kept and 0 < again.written < full.kept
    assert sorted(keys) == sorted(_keys(tmp_path / "a"))
    with pytest.raises(Exception, match="same --where"):
        run_select(scored["captions"], scored["root"] / "scores", "clip_score > 0.9", out)


@pytest.mark.parametrize("exact_limit", [1_000_000, 100])  # flat index, and the IVF path used at scale
def test_dedup_pass_on_planted_embeddings(tmp_path, monkeypatch, exact_limit):
    import curate.dedup as D
    from curate.scorers import score_schema
    from shards.writer import ShardWriter

    monkeypatch.setattr(D, "EXACT_LIMIT", exact_limit)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2000, 64)).astype(np.float32)
    copies = base[:100] + rng.normal(scale=0.03, size=(100, 64)).astype(np.float32)
    vecs = np.concatenate([base, copies])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    keys = [f"img{i}" for i in range(2000)] + [f"copy{i}" for i in range(100)]
    writer = ShardWriter(tmp_path, rows_per_shard=500, schema=score_schema(["clip", "dedup"]))
    for i, (k, v) in enumerate(zip(keys, vecs)):
        sha = hashlib.sha256(b"same" if k in ("img5", "img7") else k.encode()).hexdigest()  # img7: img5's bytes
        writer.add({"key": k, "clip_image_emb": None if k == "img9" else v.tolist(), "content_sha256": None if k == "img11" else sha})
    writer.close()
    tables = list(D.find_duplicates(tmp_path, threshold=0.95, rows_per_table=700))
    assert [t.num_rows for t in tables] == [700, 700, 700]
    table = pa.concat_tables(tables).to_pylist()
    row = {r["key"]: r for r in table}
    assert len(table) == len(keys)
    found = sum(row[f"copy{i}"]["dup_cluster"] == f"img{i}" and row[f"copy{i}"]["near_duplicate"] for i in range(100))
    assert found >= 95
    assert row["img7"]["exact_duplicate"] and row["img7"]["dup_cluster"] == "img5" and row["img7"]["near_duplicate"]
    assert not row["img5"]["near_duplicate"] and row["img9"]["dup_cluster"] is None
    assert not row["img11"]["exact_duplicate"] and row["img11"]["dup_cluster"] == "img11"  # no digest: only its embedding
    distinct = [r for r in table if r["key"].startswith("img") and r["key"] not in ("img5", "img7")]
    assert all(r["dup_cluster_size"] <= 2 and not r["near_duplicate"] for r in distinct), "no false merges"


def test_world_quality_axis_is_recorded_and_off_by_default(tmp_path):
    plain = W.write_sam_folder(tmp_path / "plain", n=20, seed=4)
    mixed = W.write_sam_folder(tmp_path / "mixed", n=20, seed=4, low_quality=0.5)
    assert all(s.quality == "high" for s in plain)
    low = [i for i, s in enumerate(mixed) if s.quality == "low"]
    assert 3 <= len(low) <= 17
    assert [dict(s.to_dict(), quality="high") for s in mixed] == [s.to_dict() for s in plain], "only the quality differs"
    records = [r for r, _ in W.read_scenes(tmp_path / "mixed")]
    assert [r["quality"] for r in records] == [s.quality for s in mixed]
    for i, s in enumerate(mixed):
        same = (tmp_path / "mixed" / f"sa_{i + 1}.jpg").read_bytes() == (tmp_path / "plain" / f"sa_{i + 1}.jpg").read_bytes()
        assert same == (s.quality == "high")


def test_select_keeps_the_extra_columns_of_its_shards(tmp_path):
    """Caption shards may carry extra columns (a class-cond stage's labels): select can filter on
    them, and the subset keeps them, so a later class-cond stage can train on it."""
    from curate.select import run_select
    from shards import CAPTION_SCHEMA, ShardWriter, iter_batches

    caps = ShardWriter(tmp_path / "caps", rows_per_shard=10, schema=CAPTION_SCHEMA.append(pa.field("shape", pa.string())))
    scores = ShardWriter(tmp_path / "scores", rows_per_shard=10, schema=pa.schema([("key", pa.string()), ("aesthetic", pa.float32())]))
    for i, (shape, rating) in enumerate([("circle", 7.0), ("circle", 2.0), ("square", 8.0), ("circle", 6.0)]):
        caps.add({"key": f"k{i}", "caption": f"a {shape}", "shape": shape})
        scores.add({"key": f"k{i}", "aesthetic": rating})
    caps.close()
    scores.close()
    summary = run_select(tmp_path / "caps", tmp_path / "scores", "aesthetic >= 5 and shape = 'circle'", tmp_path / "out")
    rows = [r for b in iter_batches(tmp_path / "out") for r in b.to_pylist()]
    assert sorted(r["key"] for r in rows) == ["k0", "k3"] and summary.kept == 2
    assert set(rows[0]) == {*CAPTION_SCHEMA.names, "shape"} and {r["shape"] for r in rows} == {"circle"}
