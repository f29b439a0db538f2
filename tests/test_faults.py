"""Issue 12: one writer per output directory, resource errors as one line (exit 2), and the
small things (img2dataset folders). Training recovery is in test_t2i_recovery.py."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.lock import LEASE_FILE, LOCK_FILE, OutputLocked, output_lock
from shards.reader import complete_shards
from tiny.images import jpeg_bytes

ROOT = Path(__file__).resolve().parent.parent


def image_folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"sa_{i}.jpg").write_bytes(jpeg_bytes(64, 48, seed=i))
    return root


def read_rows(out: Path) -> pl.DataFrame:
    shards = complete_shards(out)
    return pl.concat([pl.read_parquet(s) for s in shards]) if shards else pl.DataFrame()


def one_line_error(text: str, expected: str) -> None:
    """The run ended with one `error: ...` line (libraries may have printed load bars before it)."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert "Traceback" not in text and len(errors) == 1 and errors[0] == lines[-1] and expected in errors[0], text


# ---- the lock ---------------------------------------------------------------------------------

def test_lock_is_exclusive_names_the_holder_and_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out, "caption") as me:
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["id"] == me["id"]
        with pytest.raises(OutputLocked, match=rf"in use by another caption run on host .*, pid {os.getpid()}, started .*: `.*`"):
            with output_lock(out, "features"):
                pass
    with output_lock(out, "caption"):  # released on exit
        pass
    # a holder killed with SIGKILL leaves the lock free (the kernel drops it)
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from shards.lock import output_lock\n" \
           f"with output_lock({str(out)!r}, 'caption'):\n    print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(OutputLocked, match=rf"pid {p.pid}"):
        with output_lock(out, "caption"):
            pass
    p.kill()
    p.wait()
    with output_lock(out, "caption"):
        pass


def test_lease_on_an_object_store(monkeypatch):
    from shards import fs, lock

    monkeypatch.setattr(lock, "LEASE_TTL_S", 3.0)
    out = "memory://bucket/leased"
    with output_lock(out, "caption"):
        first = json.loads(fs.read_text(fs.join(out, LEASE_FILE)))
        time.sleep(1.5)  # the heartbeat renews it
        assert json.loads(fs.read_text(fs.join(out, LEASE_FILE)))["heartbeat"] > first["heartbeat"]
        with pytest.raises(OutputLocked, match="leased by another caption run"):
            with output_lock(out, "caption"):
                pass
    assert not fs.exists(fs.join(out, LEASE_FILE))  # released
    # a crashed holder's lease (no heartbeat) expires and is taken over
    fs.write_text(fs.join(out, LEASE_FILE), json.dumps({"id": "dead", "pid": 1, "heartbeat": time.time() - 10, "expires": time.time() - 7}))
    with output_lock(out, "caption"):
        pass


@pytest.mark.slow
def test_two_caption_runs_on_one_out_second_is_refused(tmp_path, tiny_llava):
    """Finding 1: two identical caption commands 1 s apart wrote every row twice."""
    src = image_folder(tmp_path / "src", 12)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(src), "--out", str(out), "--model", str(tiny_llava),
           "--backend", "transformers", "--max-new-tokens", "8", "--temperature", "0", "--batch-size", "2",
           "--shard-size", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # the first run holds the lock (it takes it before loading the model)
        lock = out / LOCK_FILE
        if lock.exists() and lock.read_text() and json.loads(lock.read_text())["pid"] == first.pid:
            break
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run ended before the second started: give it more work"
    assert second.returncode == 2
    one_line_error(second.stderr, f"pid {first.pid}")
    assert "caption run on host" in second.stderr and "pass another --out" in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = read_rows(out)
    assert rows.height == rows["key"].n_unique() == 12  # exactly one row per key


# ---- resource errors ----------------------------------------------------------------------------

def caption_cli(src: Path, out: Path, model: Path | str, *extra: str):
    from typer.testing import CliRunner

    import cli

    return CliRunner().invoke(cli.app, ["caption", "--src", str(src), "--out", str(out), "--model", str(model), "--backend",
                                        "transformers", "--max-new-tokens", "4", "--shard-size", "2", "--no-progress", *extra])


def test_corrupt_parquet_source_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "caption", "--src", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    one_line_error(r.stderr, f"--src {bad} is not a readable Parquet file")


def test_out_under_a_file_is_one_line_before_models_load(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli

    (tmp_path / "file").write_text("x")
    src = image_folder(tmp_path / "src", 1)
    under = tmp_path / "file" / "out"
    r = caption_cli(src, under, "no/such/model")  # the model would fail to load: the --out error comes first
    assert r.exit_code == 2
    one_line_error(r.output, "a part of the path is a file")
    r = caption_cli(src, tmp_path / "file", "no/such/model")
    assert r.exit_code == 2
    one_line_error(r.output, "is a file: pass a directory")
    r = CliRunner().invoke(cli.app, ["train", "--shards", str(src), "--out", str(under), "--preset", "PixArt-tiny/2",
                                     "--vae", "no/vae", "--text-encoder", "no/t5", "--resolution", "16"])
    assert r.exit_code == 2
    one_line_error(r.output, "a part of the path is a file")


@pytest.mark.parametrize("code, expected", [(errno.EROFS, "the file system is read-only"), (errno.EACCES, "permission denied")])
def test_read_only_or_denied_output_is_one_line(tmp_path, monkeypatch, code, expected):
    from shards import lock

    def refuse(path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(lock.fs, "makedirs", refuse)  # as a read-only mount / a foreign directory answers (tests run as root)
    src = image_folder(tmp_path / "src", 1)
    r = caption_cli(src, tmp_path / "out", "no/such/model")
    assert r.exit_code == 2
    one_line_error(r.output, f"cannot write --out {tmp_path / 'out'}: {expected}")  # shards.checks: before any model


def test_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, tiny_llava):
    from shards import writer

    src = image_folder(tmp_path / "src", 5)
    out = tmp_path / "out"
    real, calls = writer.pq.write_table, {"n": 0}

    def fills_up(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:  # the first shard fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(writer.pq, "write_table", fills_up)
    r = caption_cli(src, out, tiny_llava)
    assert r.exit_code == 2
    one_line_error(r.output, f"cannot write {out}: no space left on the device")
    assert read_rows(out).height == 2  # only the complete shard counts
    monkeypatch.setattr(writer.pq, "write_table", real)
    r = caption_cli(src, out, tiny_llava)
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    assert rows.height == rows["key"].n_unique() == 5


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked while the trainer holds its run directory; one that outlives
    its killed parent for a few seconds must not keep the directory locked."""
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()
    with output_lock(out, "train"):
        pid = os.fork()
        if pid == 0:  # the child: its fork hooks have run; it says so, then sleeps holding what it kept
            os.write(ready_w, b"1")
            time.sleep(30)
            os._exit(0)
    assert os.read(ready_r, 1) == b"1"
    try:
        with output_lock(out, "train"):  # the parent let go; the living child must not hold it
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_score_refuses_an_output_another_run_holds(tmp_path):
    from curate.api import ScoreConfig, run_score

    out = tmp_path / "scores"
    with output_lock(out, "score"):
        with pytest.raises(OutputLocked, match=r"in use by another score run"):
            run_score(ScoreConfig(shards=tmp_path / "no-captions", out=out, scorers="image"))
    assert not list(out.glob("*.parquet"))


# ---- small things -------------------------------------------------------------------------------

def test_img2dataset_folder_is_not_refused_for_its_metadata_parquet(tmp_path):
    from shards.images.sources import count_items, iter_sources

    root = tmp_path / "laion"
    (root / "00000").mkdir(parents=True)
    for i in range(3):
        key = f"00000{i:04d}"
        (root / "00000" / f"{key}.jpg").write_bytes(jpeg_bytes(64, 48, seed=i))
        (root / "00000" / f"{key}.txt").write_text(f"alt {i}")
        (root / "00000" / f"{key}.json").write_text(json.dumps({"url": "http://x", "key": key, "caption": f"alt {i}",
                                                                 "status": "success", "width": 64, "height": 48}))
    pq.write_table(pa.table({"url": ["http://x"] * 3, "key": ["000000000", "000000001", "000000002"], "caption": ["a", "b", "c"],
                             "status": ["success"] * 3}), root / "00000.parquet")
    items = list(iter_sources([root]))
    assert [it.key for it in items] == [f"laion/00000/00000{i:04d}.jpg" for i in range(3)]
    assert [it.alt for it in items] == ["alt 0", "alt 1", "alt 2"]  # the img2dataset sidecar's caption
    assert count_items([root]) == 3


def test_truncated_tar_error_row_goes_once_the_tar_is_whole(tmp_path, tiny_llava):
    import tarfile

    from autolabel.api import run_caption
    from autolabel.backends import TransformersCaptioner

    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tf:
        for i in range(3):
            data = jpeg_bytes(64, 48, seed=i)
            info = tarfile.TarInfo(f"sa_{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    tar = tmp_path / "sa_000000.tar"
    tar.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # a download cut short
    captioner = TransformersCaptioner(str(tiny_llava))
    kw = dict(max_new_tokens=2, shard_size=2, progress=False, captioner=captioner)
    run_caption([tar], tmp_path / "out", **kw)
    rows = read_rows(tmp_path / "out")
    assert "sa_000000.tar#truncated" in rows["key"].to_list()
    tar.write_bytes(whole.getvalue())  # downloaded again, whole
    run_caption([tar], tmp_path / "out", retry_failed=True, **kw)
    rows = read_rows(tmp_path / "out")
    assert sorted(rows["key"]) == [f"sa_000000.tar/sa_{i}.jpg" for i in range(3)]
    assert rows["error"].null_count() == 3


def test_vllm_logs_to_stderr_and_its_temp_dir_goes_at_exit(tmp_path):
    code = ("import os; from autolabel.backends import vllm_env; vllm_env(); "
            "print(os.environ['VLLM_LOGGING_STREAM'], os.environ['VLLM_RPC_BASE_PATH'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    stream, base = r.stdout.split()
    assert stream == "ext://sys.stderr" and "t2i-vllm-" in base
    assert not Path(base).exists()
