"""Shard directories and caption sources on S3, over the real S3 protocol: pyarrow's S3 client
talks HTTP to a local moto server (AWS_ENDPOINT_URL), the way it talks to AWS or any S3-compatible
store (MinIO, R2, GCS's XML API). Covers the CLI writing shards to s3://, a crash between a shard's
PUT and its marker's PUT, resume, stats reading s3:// shards, and the Ray engine reading images
from s3:// and writing shards to s3://.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from autolabel.api import run_caption
from cli import app
from conftest import ROOT
from shards import complete_shards, fs, iter_batches, read_manifest
from tiny.images import jpeg_bytes



def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server (the dev extra installs moto[server]) in its own process: its Flask app
    must not live in the test process, where vLLM's kernel registration trips over Flask's proxies."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except urllib.error.HTTPError:  # it answers: up
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto server did not start on {url}")


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint for this module: env vars as a user would set them, two buckets."""
    import boto3

    server, url = start_moto()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for bucket in ("caps", "imgs"):
        client.create_bucket(Bucket=bucket)
    yield {"client": client, "env": env}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


def rows(out) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_batches(list(iter_batches(out)))).sort("key")


def make_sam(src: Path, n: int = 4) -> None:
    """An SA-1B-style folder: images with json sidecars, and one truncated image."""
    src.mkdir(parents=True)
    for i in range(n):
        (src / f"sa_{i}.jpg").write_bytes(jpeg_bytes(90 + 10 * i, 60 + 5 * i, seed=i))
        (src / f"sa_{i}.json").write_text(json.dumps({"image": {"image_id": 100 + i, "width": 90 + 10 * i, "height": 60 + 5 * i}}))
    (src / "broken.jpg").write_bytes(jpeg_bytes(90, 60, seed=9)[:200])


def cli_caption(src: str, out: str, model: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "cli.py"), "caption", "--src", src, "--out", out, "--model", str(model),
           "--backend", "transformers", "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "2",
           "--shard-size", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)


KW = dict(max_new_tokens=4, temperature=0.0, batch_size=2, shard_size=2, progress=False)


@pytest.mark.slow
def test_cli_caption_to_s3_survives_a_lost_marker_and_stats_reads_it(s3, tmp_path, tiny_llava, hf_captioner):
    src = tmp_path / "sam"
    make_sam(src)
    run_caption([src], tmp_path / "local", captioner=hf_captioner, **KW)
    expected = rows(tmp_path / "local")

    out = "s3://caps/run"
    r = cli_caption(str(src), out, tiny_llava, s3["env"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "captioned 4, failed 1" in r.stdout
    assert rows(out).equals(expected)
    objects = {o["Key"] for o in s3["client"].list_objects_v2(Bucket="caps", Prefix="run/")["Contents"]}
    shards = sorted(k for k in objects if k.endswith(".parquet"))
    assert len(shards) == 3 and all(f"{k}.done" in objects for k in shards) and "run/manifest.json" in objects
    assert not [k for k in objects if k.endswith(".tmp")]  # one PUT per shard: no temp objects
    assert read_manifest(out)["rows"] == 5

    # a crash after a shard's PUT and before its marker's: the shard does not count, and the
    # rerun deletes it and captions only its keys
    lost_shard = shards[0]
    lost = set(pl.from_arrow(fs.read_table(f"s3://caps/{lost_shard}"))["key"])
    s3["client"].delete_object(Bucket="caps", Key=f"{lost_shard}.done")
    assert len(complete_shards(out)) == 2
    r = cli_caption(str(src), out, tiny_llava, s3["env"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipped as already done {5 - len(lost)}" in r.stdout
    assert rows(out).equals(expected)
    objects = {o["Key"] for o in s3["client"].list_objects_v2(Bucket="caps", Prefix="run/")["Contents"]}
    assert lost_shard not in objects

    # stats reads the s3:// shard directory: the same numbers as on the local copy
    res = {}
    for name, where in (("s3", out), ("local", str(tmp_path / "local"))):
        r = CliRunner().invoke(app, ["stats", where, "--json", "--no-progress", "--workers", "1"])
        assert r.exit_code == 0, r.output
        res[name] = json.loads(r.output)["datasets"][0]
    for key in ("captions", "total_nouns", "distinct_nouns", "valid_nouns"):
        assert res["s3"][key] == res["local"][key], key
    assert res["s3"]["captions"] == 4


@pytest.mark.slow
def test_ray_engine_reads_images_from_s3_and_writes_shards_to_s3(s3, tmp_path, tiny_llava, hf_captioner):
    import ray
    src = tmp_path / "sam"
    make_sam(src, n=3)
    for p in sorted(src.iterdir()):
        s3["client"].put_object(Bucket="imgs", Key=f"sam/{p.name}", Body=p.read_bytes())
    run_caption([src], tmp_path / "local", captioner=hf_captioner, **KW)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers inherit the AWS_* env
    try:
        s = run_caption(["s3://imgs/sam"], "s3://caps/ray", engine="ray", model=str(tiny_llava), backend="transformers", **KW)
    finally:
        ray.shutdown()
    assert (s.captioned, s.failed) == (3, 1)
    got, want = rows("s3://caps/ray"), rows(tmp_path / "local")
    assert got["key"].to_list() == want["key"].to_list() == ["sam/broken.jpg", "sam/sa_0.jpg", "sam/sa_1.jpg", "sam/sa_2.jpg"]
    assert got["source"].str.starts_with("s3://imgs/sam/").all()
    # same captions, errors and sidecar fields whether the images came from disk or from S3
    cols = ["key", "caption", "image_id", "width", "height"]
    assert got.select(cols).equals(want.select(cols))
    assert got["error"].is_null().to_list() == want["error"].is_null().to_list()
    assert read_manifest("s3://caps/ray")["config"]["engine"] == "ray"
