"""Shard directories on object stores / fsspec URIs (shards.fs): the writer, reader, caption
(resume, crash leftovers, --retry-failed), stats and features on `memory://`, the CLI on `file://`
URIs, and one-line errors for URIs nothing can open.

`memory://` is fsspec's in-process filesystem (through pyarrow's FSSpecHandler, the same path any
fsspec backend takes); it cannot cross a subprocess, so the CLI is exercised with `file://`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from autolabel.api import run_caption
from shards.layout import JOURNAL
from shards.retry import finish_interrupted_retry
from cli import app
from conftest import LAION_SAMPLE, ROOT
from shards import CaptionRow, ShardWriter, UserError, clean_incomplete, complete_shards, done_keys, fs, iter_batches, read_manifest
from shards.schema import CAPTION_SCHEMA
from shards.writer import done_marker, sha256_file
from tiny.images import jpeg_bytes

BUCKET = "memory://bucket"


@pytest.fixture(autouse=True)
def memory_fs():
    """An empty `memory://` before and after every test (it is one global store per process)."""
    mem = fsspec.filesystem("memory")

    def clear():
        mem.store.clear()
        mem.pseudo_dirs.clear()
        mem.pseudo_dirs.append("")

    clear()
    yield mem
    clear()


def rows(out) -> pl.DataFrame:
    """All rows of the complete shards of `out` (a path or a URI), sorted by key."""
    return pl.from_arrow(pa.Table.from_batches(list(iter_batches(out)))).sort("key")


# --- shards.fs and the shard layer -----------------------------------------------------------


def test_locations_local_and_remote(tmp_path):
    assert fs.as_location("C:/data/out") == Path("C:/data/out")  # a Windows drive is a path, not a scheme
    assert fs.as_location((tmp_path / "a b").as_uri()) == tmp_path / "a b"  # file:// is local (percent-decoded)
    assert fs.as_location(f"{BUCKET}/x/") == f"{BUCKET}/x"
    assert fs.join(f"{BUCKET}/x", "part.parquet") == f"{BUCKET}/x/part.parquet"
    assert fs.join(tmp_path, "part.parquet") == tmp_path / "part.parquet"
    filesystem, path = fs.resolve(f"{BUCKET}/x")
    assert path == "/bucket/x" and filesystem.type_name.startswith("py::fsspec")
    with pytest.raises(UserError, match=r"^nosuch://bucket/x: unknown filesystem scheme 'nosuch'") as e:
        fs.resolve("nosuch://bucket/x")
    assert len(str(e.value).splitlines()) == 1


def test_writer_and_reader_round_trip_on_memory():
    out = f"{BUCKET}/captions"
    w = ShardWriter(out, rows_per_shard=3, config={"model": "m"})
    for i in range(7):
        w.add(CaptionRow(key=f"k{i}", caption=f"a cat {i}", error=None if i != 4 else "bad"))
    manifest = w.close()
    shards = complete_shards(out)
    assert shards == [f"{out}/part-{i:05d}-{w.writer_id}.parquet" for i in range(3)]
    assert [fs.parquet_file(s).metadata.num_rows for s in shards] == [3, 3, 1]
    assert manifest["rows"] == 7 and read_manifest(out)["config"] == {"model": "m"}
    assert [s["shard"] for s in read_manifest(out)["shards"]] == [fs.basename(s) for s in shards]
    marker = json.loads(fs.read_text(done_marker(shards[0])))
    assert marker["sha256"] == sha256_file(shards[0]) and marker["bytes"] == fs.size(shards[0]) and marker["rows"] == 3
    assert done_keys(out) == {f"k{i}" for i in range(7)}
    assert done_keys(out, where_ok=True) == {f"k{i}" for i in range(7)} - {"k4"}
    df = rows(out)
    assert df["key"].to_list() == [f"k{i}" for i in range(7)] and df["caption"][2] == "a cat 2"
    assert fs.read_table(shards[0]).schema.equals(CAPTION_SCHEMA, check_metadata=False)

    # a crash after the shard's PUT but before its marker's, and a temp file: invisible, then cleaned
    fs.delete(done_marker(shards[1]))
    fs.write_bytes(f"{out}/.part-00009-deadbeef.parquet.tmp", b"half")
    assert complete_shards(out) == [shards[0], shards[2]]
    assert done_keys(out) == {"k0", "k1", "k2", "k6"}
    assert set(clean_incomplete(out)) == {shards[1], f"{out}/.part-00009-deadbeef.parquet.tmp"}
    assert sorted(fs.list_names(out)) == sorted([fs.basename(shards[0]), fs.basename(shards[2]), "manifest.json"]
                                                + [fs.basename(done_marker(s)) for s in (shards[0], shards[2])])  # fmt: skip
    # a new writer never reuses a name that exists
    w2 = ShardWriter(out, rows_per_shard=2)
    assert fs.basename(w2.write_table(fs.read_table(shards[0]))).startswith("part-00003-")


def test_interrupted_retry_swap_is_finished_on_memory():
    """The --retry-failed journal works on an object store: the crash window leaves both shards,
    the next run drops the replaced one."""
    out = f"{BUCKET}/out"
    w = ShardWriter(out, rows_per_shard=10)
    old = w.write_table(pa.Table.from_pylist([{"key": "a", "error": "broken"}, {"key": "b", "caption": "x"}], CAPTION_SCHEMA))
    new_name = w.next_shard_name()
    fs.write_text(fs.join(out, JOURNAL), json.dumps({new_name: [fs.basename(old)]}))
    w.write_table(pa.Table.from_pylist([{"key": "a", "caption": "fixed"}, {"key": "b", "caption": "x"}], CAPTION_SCHEMA))
    assert rows(out).height == 4  # the crash window: both complete
    finish_interrupted_retry(out)
    df = rows(out)
    assert df["key"].to_list() == ["a", "b"] and df["caption"][0] == "fixed"
    assert not fs.exists(fs.join(out, JOURNAL)) and not fs.exists(old) and not fs.exists(done_marker(old))


# --- caption -----------------------------------------------------------------------------------


def make_images(src: Path, n: int = 5) -> None:
    src.mkdir(parents=True)
    for i in range(n):
        (src / f"sa_{i}.jpg").write_bytes(jpeg_bytes(90 + 10 * i, 60 + 5 * i, seed=i))
    (src / "broken.jpg").write_bytes(jpeg_bytes(90, 60, seed=9)[:200])  # truncated: an error row


def test_caption_to_memory_matches_local_resumes_and_retries(tmp_path, hf_captioner):
    src = tmp_path / "src"
    make_images(src)
    kw = dict(max_new_tokens=4, temperature=0.0, batch_size=2, shard_size=2, progress=False, captioner=hf_captioner)
    local = run_caption([src], tmp_path / "local", **kw)
    out = f"{BUCKET}/captions"
    s = run_caption([src], out, **kw)
    assert (s.captioned, s.failed) == (local.captioned, local.failed) == (5, 1)
    expected = rows(tmp_path / "local")
    assert rows(out).equals(expected)
    assert s.shards == [fs.basename(p) for p in complete_shards(out)] and len(s.shards) == 3
    assert read_manifest(out)["rows"] == 6 and read_manifest(out)["config"]["backend"] == "transformers"

    # a rerun skips every key
    again = run_caption([src], out, **kw)
    assert (again.captioned, again.failed, again.skipped) == (0, 0, 6)

    # a crash's leftovers: a shard whose marker never landed, and a temp file; the rerun cleans
    # them and captions only the lost keys
    first = complete_shards(out)[0]
    lost = set(pl.from_arrow(fs.read_table(first))["key"])
    fs.delete(done_marker(first))
    fs.write_bytes(f"{out}/.part-00099-deadbeef.parquet.tmp", b"partial")
    resumed = run_caption([src], out, **kw)
    assert resumed.skipped == 6 - len(lost) and resumed.captioned + resumed.failed == len(lost) == 2
    assert rows(out).equals(expected)
    assert not fs.exists(first) and not [n for n in fs.list_names(out) if n.endswith(".tmp")]

    # --retry-failed: the broken image is fixed, its row replaced by copy-on-write, one row per key
    (src / "broken.jpg").write_bytes(jpeg_bytes(70, 50, seed=7))
    retry = run_caption([src], out, retry_failed=True, **kw)
    assert (retry.retried, retry.captioned, retry.failed) == (1, 1, 0)
    df = rows(out)
    assert df.height == df["key"].n_unique() == 6 and df["error"].is_null().all()
    assert not fs.exists(fs.join(out, JOURNAL))
    assert df.filter(pl.col("key") != "src/broken.jpg").equals(expected.filter(pl.col("key") != "src/broken.jpg"))


def test_caption_out_uri_problems_are_user_errors(tmp_path, hf_captioner):
    src = tmp_path / "src"
    make_images(src, n=1)
    fs.write_bytes(f"{BUCKET}/a-file", b"x")
    with pytest.raises(UserError, match="is a file: pass a directory"):
        run_caption([src], f"{BUCKET}/a-file", progress=False, captioner=hf_captioner)
    with pytest.raises(UserError, match="unknown filesystem scheme"):
        run_caption([src], "nosuch://bucket/out", progress=False, captioner=hf_captioner)


def cli_caption(src: Path, out: str, model: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(src), "--out", out, "--model", str(model),
           "--backend", "transformers", "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "2",
           "--shard-size", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cli_caption_to_a_file_uri_matches_a_local_path_and_resumes(tmp_path, tiny_llava, hf_captioner):
    src = tmp_path / "src"
    make_images(src, n=3)
    out = tmp_path / "out dir"  # as_uri() percent-encodes the space
    r = cli_caption(src, out.as_uri(), tiny_llava)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "captioned 3, failed 1" in r.stdout
    local = tmp_path / "local"
    run_caption([src], local, max_new_tokens=4, temperature=0.0, batch_size=2, shard_size=2, progress=False, captioner=hf_captioner)
    assert rows(out).equals(rows(local))  # the URI named this very directory
    assert json.loads((out / "manifest.json").read_text())["rows"] == 4
    r = cli_caption(src, out.as_uri(), tiny_llava)
    assert r.returncode == 0 and "captioned 0, failed 0, skipped as already done 4" in r.stdout, r.stderr[-2000:]


def test_cli_unknown_out_scheme_is_one_line_error(tmp_path, tiny_llava):
    src = tmp_path / "src"
    make_images(src, n=1)
    r = cli_caption(src, "nosuch://bucket/out", tiny_llava)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: nosuch://bucket/out: unknown filesystem scheme 'nosuch'"), err


# --- stats and features ------------------------------------------------------------------------


def test_stats_on_memory_shard_dir_and_parquet_equal_local(tmp_path):
    from dataset_stats.api import StatsOptions, run_stats

    captions = pq.read_table(LAION_SAMPLE, columns=["TEXT"]).column("TEXT").to_pylist()[:150]
    local = tmp_path / "captions"
    w = ShardWriter(local, rows_per_shard=40)
    w.add_many({"key": f"k{i}", "caption": c} for i, c in enumerate(captions))
    w.close()
    pq.write_table(pa.table({"x": [1]}), local / "part-00099-deadbeef.parquet")  # no marker: ignored
    fsspec.filesystem("memory").put(str(local), "/bucket/captions", recursive=True)
    pq.write_table(pa.table({"TEXT": captions}), tmp_path / "laion.parquet")
    fsspec.filesystem("memory").put(str(tmp_path / "laion.parquet"), "/bucket/laion.parquet")

    opts = StatsOptions(workers=1, progress=False)
    remote = run_stats([f"a={BUCKET}/captions", f"b={BUCKET}/laion.parquet"], opts)["datasets"]
    here = run_stats([f"a={local}", f"b={tmp_path / 'laion.parquet'}"], opts)["datasets"]
    assert remote[0]["files"] == [f"{BUCKET}/captions/part-{i:05d}-{w.writer_id}.parquet" for i in range(4)]
    for d in remote + here:
        d.pop("files")
    assert remote == here
    assert remote[0]["captions"] == 150 and remote[0]["total_nouns"] > 150

    r = CliRunner().invoke(app, ["stats", "nosuch://bucket/x.parquet", "--no-progress"])
    assert r.exit_code == 2 and "unknown filesystem scheme 'nosuch'" in r.output and "Traceback" not in r.output


def test_features_read_caption_shards_from_memory(tmp_path):
    """compute_features keeps the URI (no Path() mangling) and streams the shards through it;
    here every row is an error row, so it stops before loading any model."""
    from t2i.features import FeatureConfig, compute_features

    cfg = FeatureConfig(vae="no/vae", text_encoder="no/t5", resolution=16)
    with pytest.raises(UserError, match=f"no complete caption shards in {BUCKET}/none"):
        compute_features(f"{BUCKET}/none", tmp_path / "feats", cfg, device="cpu", progress=False)
    w = ShardWriter(f"{BUCKET}/caps", rows_per_shard=2)
    w.add_many({"key": f"k{i}", "error": "unreadable"} for i in range(3))
    w.close()
    with pytest.raises(UserError, match=f"{BUCKET}/caps has no rows with a caption"):
        compute_features(f"{BUCKET}/caps", tmp_path / "feats", cfg, device="cpu", progress=False)


@pytest.mark.slow
def test_ray_engines_write_and_read_memory_uris(tmp_path, tiny_llava, hf_captioner):
    """--engine ray: the driver is the single writer, so it writes to any URI this process opens
    (memory:// included); stats on Ray reads a memory:// shard dir through the driver's readers."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from dataset_stats.api import StatsOptions, run_stats

    src = tmp_path / "src"
    make_images(src, n=3)
    kw = dict(max_new_tokens=4, temperature=0.0, batch_size=2, shard_size=2, progress=False)
    run_caption([src], tmp_path / "local", captioner=hf_captioner, **kw)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one Ray for both jobs
    try:
        s = run_caption([src], f"{BUCKET}/ray", engine="ray", model=str(tiny_llava), backend="transformers", **kw)
        assert (s.captioned, s.failed) == (3, 1)
        assert rows(f"{BUCKET}/ray").equals(rows(tmp_path / "local"))
        assert read_manifest(f"{BUCKET}/ray")["config"]["engine"] == "ray"

        opts = dict(workers=1, progress=False)
        on_ray = run_stats([f"{BUCKET}/ray"], StatsOptions(engine="ray", **opts))["datasets"][0]
        here = run_stats([f"{BUCKET}/ray"], StatsOptions(**opts))["datasets"][0]
        assert on_ray == here and here["captions"] == 3
    finally:
        ray.shutdown()
