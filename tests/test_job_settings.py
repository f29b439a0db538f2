"""Every writing job records its settings when it starts (`run.json`, before any shard) and
refuses, in one line with exit code 2, a rerun into the same output whose identity settings
differ (issue 30, defect 1): a run killed after its first shard, then rerun with other settings,
never mixes two kinds of rows. The same settings resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import cli
from shards import ShardWriter, complete_shards, done_keys
from shards import writer as shard_writer
from shards.layout import MANIFEST, RUN_RECORD


class Killed(Exception):
    """Stands for kill -9 right after the first shard is committed: the run never finishes."""


def run_killed_after_first_shard(monkeypatch, args: list[str]) -> None:
    real = shard_writer.commit_table

    def commit_then_die(shard, table):
        real(shard, table)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(shard_writer, "commit_table", commit_then_die)
        r = CliRunner().invoke(cli.app, args)
    assert isinstance(r.exception, Killed), r.output


def assert_interrupted_with_settings_recorded(out: Path, **settings) -> None:
    assert len(complete_shards(out)) == 1 and not (out / MANIFEST).exists()  # killed: the manifest never came
    record = json.loads((out / RUN_RECORD).read_text())
    for name, value in settings.items():
        assert record["settings"][name] == value and name in record["identity"], name


def assert_refused(args: list[str], flag: str) -> None:
    r = CliRunner().invoke(cli.app, args)
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("error: ") and f"made with {flag} " in lines[0] and f"pass the same {flag} to resume" in lines[0], lines[0]


def assert_resumes(args: list[str], out: Path, keys: set[str]) -> None:
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    got = [k for s in complete_shards(out) for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]
    assert len(got) == len(set(got)) and set(got) == keys and (out / MANIFEST).exists()


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    from tiny.world import write_simple_world

    caps = tmp_path_factory.mktemp("job-settings") / "captions"
    write_simple_world(caps, 8, rows_per_shard=8)
    return caps


def test_caption_rerun_with_other_settings_is_refused(tmp_path, monkeypatch):
    import io

    import numpy as np
    from PIL import Image

    from tiny.llava import build_tiny_llava

    model = build_tiny_llava(tmp_path / "llava", seed=0)
    (tmp_path / "src").mkdir()
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((32, 48, 3)) * 255).astype("uint8")).save(buf, "JPEG")
        (tmp_path / "src" / f"sa_{i}.jpg").write_bytes(buf.getvalue())
    out = tmp_path / "out"

    def args(tokens: str) -> list[str]:
        return ["caption", "--src", str(tmp_path / "src"), "--out", str(out), "--model", str(model), "--backend", "transformers",
                "--max-new-tokens", tokens, "--temperature", "0", "--batch-size", "2", "--shard-size", "2", "--no-progress"]

    run_killed_after_first_shard(monkeypatch, args("4"))
    assert_interrupted_with_settings_recorded(out, max_new_tokens=4, model=str(model))
    assert_refused(args("6"), "--max-new-tokens")
    assert_resumes(args("4"), out, {f"src/sa_{i}.jpg" for i in range(5)})


def test_score_rerun_with_other_scorers_is_refused(tmp_path, monkeypatch, captions):
    out = tmp_path / "scores"

    def args(scorers: str) -> list[str]:
        return ["score", "--shards", str(captions), "--out", str(out), "--scorers", scorers, "--batch-size", "2",
                "--shard-size", "2", "--workers", "1", "--no-progress"]

    run_killed_after_first_shard(monkeypatch, args("image"))
    assert_interrupted_with_settings_recorded(out, scorers=["image"], shards=str(captions))
    assert_refused(args("image,lang"), "--scorers")
    assert_resumes(args("image"), out, done_keys(captions))
    assert json.loads((out / "ledger.jsonl").read_text().splitlines()[-1])["job"] == "score"  # metered too


def test_select_rerun_with_another_where_is_refused(tmp_path, monkeypatch, captions):
    scores = ShardWriter(tmp_path / "scores", rows_per_shard=4, schema=pa.schema([("key", pa.string()), ("aesthetic", pa.float32())]))
    keys = sorted(done_keys(captions))
    scores.add_many({"key": k, "aesthetic": float(i)} for i, k in enumerate(keys))
    scores.close()
    out = tmp_path / "sel"

    def args(where: str) -> list[str]:
        return ["select", "--shards", str(captions), "--scores", str(tmp_path / "scores"), "--where", where, "--out", str(out),
                "--shard-size", "2"]

    run_killed_after_first_shard(monkeypatch, args("aesthetic >= 2"))
    assert_interrupted_with_settings_recorded(out, where="aesthetic >= 2")
    assert_refused(args("aesthetic >= 5"), "--where")
    assert_resumes(args("aesthetic >= 2"), out, set(keys[2:]))
    assert json.loads((out / "ledger.jsonl").read_text().splitlines()[-1])["job"] == "select"


def test_features_settings_name_their_directory_and_a_foreign_one_is_refused(tmp_path, monkeypatch, captions):
    """features' identity settings are hashed into the directory name (the cache key), so a rerun
    with another --resolution writes its own directory and mixes nothing; a directory whose
    recorded settings are not its name's (moved, or made by another version) is refused."""
    from t2i.features import FeatureConfig, features_dir
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus

    models = build_tiny_models(tmp_path / "models", simple_corpus(), vae_fit_steps=0)
    root = tmp_path / "feats"

    def args(resolution: str) -> list[str]:
        return ["features", "--shards", str(captions), "--out", str(root), "--vae", models["vae"], "--text-encoder",
                models["text_encoder"], "--resolution", resolution, "--max-tokens", "16", "--text-dtype", "float32",
                "--batch-size", "2", "--shard-size", "2", "--workers", "1"]

    def fdir(resolution: int) -> Path:
        return features_dir(root, FeatureConfig(vae=models["vae"], text_encoder=models["text_encoder"], resolution=resolution,
                                                max_tokens=16, text_dtype="float32"))

    run_killed_after_first_shard(monkeypatch, args("16"))
    assert_interrupted_with_settings_recorded(fdir(16), resolution=16, vae=models["vae"])
    assert_resumes(args("32"), fdir(32), done_keys(captions))  # its own directory: nothing mixed
    assert len(complete_shards(fdir(16))) == 1
    fdir(16).rename(fdir(64))  # the interrupted resolution-16 run, now under resolution 64's name
    assert_refused(args("64"), "--resolution")
    fdir(64).rename(fdir(16))
    assert_resumes(args("16"), fdir(16), done_keys(captions))


def test_an_earlier_versions_output_is_checked_against_its_manifest(tmp_path):
    """Outputs written before run records existed: the manifest's config stands in for the record."""
    from shards.errors import UserError
    from shards.job import JobSpec, job_run
    from shards.writer import write_manifest

    out = tmp_path / "sel"
    ShardWriter(out, rows_per_shard=1).add({"key": "a"})
    write_manifest(out, config={"shards": "caps", "scores": "scores", "where": "x > 1"})

    def spec(where: str) -> JobSpec:
        return JobSpec("select", out, settings={"shards": "caps", "scores": "scores", "where": where, "shard_size": 5},
                       identity=("shards", "scores", "where"), device="cpu")

    with pytest.raises(UserError, match=r"made with --where 'x > 1' \(this run: 'x > 2'\): pass the same --where"):
        with job_run(spec("x > 2")):
            pass
    assert not (out / RUN_RECORD).exists()
    with job_run(spec("x > 1")) as run:  # the same: resumes, and records its settings from now on
        assert run.done == {"a"}
        run.finish()
    assert json.loads((out / RUN_RECORD).read_text())["identity"] == {"shards": "caps", "scores": "scores", "where": "x > 1"}


def test_caption_rerun_after_its_model_folder_was_refitted_in_place_is_refused(tmp_path, monkeypatch):
    """A local model is recorded by its contents too (shards.hub.local_model_digest): the same
    --model path holding other weights (a refit into the same folder) is refused in one line;
    the files put back resume."""
    import shutil

    from tiny.llava import build_tiny_llava

    model = build_tiny_llava(tmp_path / "llava", seed=0)
    shutil.copytree(model, tmp_path / "llava-seed0")
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"sa_{i}.jpg").write_bytes(_jpeg(i))
    out = tmp_path / "out"
    args = ["caption", "--src", str(tmp_path / "src"), "--out", str(out), "--model", str(model), "--backend", "transformers",
            "--max-new-tokens", "4", "--temperature", "0", "--batch-size", "2", "--shard-size", "2", "--no-progress"]
    run_killed_after_first_shard(monkeypatch, args)
    assert json.loads((out / RUN_RECORD).read_text())["identity"]["model_digests"]["model"]
    shutil.rmtree(model)
    build_tiny_llava(model, seed=1)  # another model, same path
    r = CliRunner().invoke(cli.app, args)
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "whose files have changed since" in lines[0], r.output
    shutil.rmtree(model)
    shutil.copytree(tmp_path / "llava-seed0", model)
    assert_resumes(args, out, {f"src/sa_{i}.jpg" for i in range(4)})


def test_model_digests_skip_hub_ids_and_older_records(tmp_path):
    from shards.errors import UserError
    from shards.job import JobSpec, check_settings, record_settings

    head = tmp_path / "head.safetensors"
    head.write_bytes(b"weights v1")
    spec = lambda model: JobSpec("score", tmp_path, settings={"m": model}, identity=("m",), models=("m",))  # noqa: E731
    assert "model_digests" not in spec("org/clip").identity  # a hub id: its revision is the hub's business
    record_settings(tmp_path, spec(str(head)))
    ShardWriter(tmp_path, rows_per_shard=1, schema=pa.schema([("key", pa.string())])).add({"key": "a"})  # one committed shard
    check_settings(tmp_path, spec(str(head)))  # unchanged: resumes
    head.write_bytes(b"weights v2")
    with pytest.raises(UserError, match="made with --m .*head.safetensors, whose files have changed since"):
        check_settings(tmp_path, spec(str(head)))
    record = json.loads((tmp_path / RUN_RECORD).read_text())
    del record["identity"]["model_digests"]  # a run recorded before digests were kept
    (tmp_path / RUN_RECORD).write_text(json.dumps(record))
    check_settings(tmp_path, spec(str(head)))


def _jpeg(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((32, 48, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()
