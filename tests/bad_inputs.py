"""The world the bad-input matrix (tests/test_bad_inputs.py) runs every command against: good
inputs to hold the rest of each command line steady (caption shards, scores, tiny models, a
two-step training run) and the bad ones (missing paths, files of the wrong kind, random bytes,
non-UTF-8 text, truncated and foreign shards, an output under a file or on a read-only place,
damaged checkpoints, hub ids that cannot be reached)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

NO_SUCH_HUB_ID = "t2i-data-tests/no-such-model"  # never in the HF cache; HF_HUB_OFFLINE=1 (conftest) or no network


def read_only_dir(root: Path) -> Path:
    """A directory nobody may write into: chmod 555 for a normal user; as root (who ignores
    modes) a path under /sys, which refuses new entries to everyone."""
    if os.geteuid() == 0:
        return Path("/sys/t2i-read-only")
    ro = root / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _marker(shard: Path) -> None:
    """The done-marker that makes `shard` count as committed (whatever it holds)."""
    shard.with_name(shard.name + ".done").write_text(json.dumps({"shard": shard.name, "rows": 1, "sha256": "", "bytes": 0}))


def _shard_dir(root: Path, name: str, data: bytes) -> Path:
    d = root / name
    d.mkdir()
    (d / "part-00000-deadbeef.parquet").write_bytes(data)
    _marker(d / "part-00000-deadbeef.parquet")
    return d


def bad_files(root: Path, good_shard: Path) -> dict[str, Path]:
    """Files and folders that no command should accept: each is named by what is wrong with it."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bad = root / "bad"
    bad.mkdir()
    files = {f"random{ext}": bad / f"random{ext}" for ext in (".bin", ".parquet", ".pt", ".safetensors", ".toml", ".txt", ".json")}
    for p in files.values():
        p.write_bytes(noise)
    latin1 = "un caf\xe9 rouge \xe0 gauche\nune tasse bleue\n".encode("latin-1")
    for ext in (".txt", ".toml", ".json"):
        files[f"latin1{ext}"] = bad / f"latin1{ext}"
        files[f"latin1{ext}"].write_bytes(latin1)
    files["a-file"] = bad / "a-file"
    files["a-file"].write_text("not a directory")
    files["empty-dir"] = bad / "empty-dir"
    files["empty-dir"].mkdir()
    files["empty.txt"] = bad / "empty.txt"
    files["empty.txt"].write_text("\n\n")
    files["missing"] = bad / "no-such-path"
    files["read-only"] = read_only_dir(bad)
    data = good_shard.read_bytes()
    files["random-shards"] = _shard_dir(bad, "random-shards", noise)
    files["truncated-shards"] = _shard_dir(bad, "truncated-shards", data[: len(data) // 2])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["a red car"]}), sink)
    files["foreign-shards"] = _shard_dir(bad, "foreign-shards", sink.getvalue().to_pybytes())
    files.update(_ledgers(bad))
    return files


def _ledgers(bad: Path) -> dict[str, Path]:
    """Run directories whose ledger.jsonl has a binary line, or a line that is not a record."""
    out = {}
    good = json.dumps({"job": "caption", "device_hours": 0.1, "energy_kwh": 0.01, "kg_co2e": 0.005,
                       "energy_source": "estimate", "device_name": "cpu"})
    for name, tail in (("ledger-binary", b"\xff\xfe\x00\x81 binary\n"), ("ledger-not-json", b'{"job": "cap\n'),
                       ("ledger-not-a-record", b'{"hello": 1}\n')):
        d = bad / name
        d.mkdir()
        (d / "ledger.jsonl").write_bytes(good.encode() + b"\n" + tail)
        out[name] = d
    return out


def damaged_checkpoints(run: Path, root: Path) -> dict[str, Path]:
    """Copies of the run's newest checkpoint: its EMA truncated; its trainer state recording
    model paths relative to a folder that is not here (a run made before paths were absolute)."""
    from t2i.checkpoint import latest_checkpoint, write_checksums

    ck = latest_checkpoint(run)
    out = {}
    truncated = root / "ck-truncated" / ck.name
    shutil.copytree(ck, truncated)
    ema = truncated / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    out["ck-truncated"] = truncated
    relative = root / "ck-relative" / ck.name
    shutil.copytree(ck, relative)
    state = json.loads((relative / "trainer_state.json").read_text())
    state["features"].update(vae="old_run/models/vae", text_encoder="old_run/models/t5")
    (relative / "trainer_state.json").write_text(json.dumps(state))
    write_checksums(relative)
    out["ck-relative"] = relative
    return out


def build_world(root: Path) -> dict[str, Path | str]:
    """Everything the matrix needs, built once (about half a minute on 2 cores)."""
    import torch

    from curate.api import ScoreConfig, run_score
    from t2i.stage import run_stage
    from t2i.train import TrainConfig
    from tiny.clip import build_tiny_clip, save_clip
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    torch.set_num_threads(1)
    w: dict[str, Path | str] = {"root": root, "hub": NO_SUCH_HUB_ID}
    w.update(build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=0))
    w["clip"] = save_clip(*build_tiny_clip(simple_corpus()), root / "clip")
    w["captions"] = root / "captions"
    write_simple_world(w["captions"], 8, rows_per_shard=4)
    w["scores"] = root / "scores"
    run_score(ScoreConfig(shards=w["captions"], out=w["scores"], scorers="lang", progress=False))
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae=w["vae"], text_encoder=w["text_encoder"], max_tokens=16,
                      text_dtype="float32", batch_size=8, steps=2, warmup_steps=1, checkpoint_every=2, log_every=1,
                      loader_workers=0)
    w["run"] = root / "run"
    run_stage(cfg, w["run"], shards=w["captions"], progress=False)
    w["images"] = root / "images"
    w["images"].mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 24), colour).save(w["images"] / f"sa_{i}.jpg")
    w["prompts"] = root / "prompts.txt"
    w["prompts"].write_text("a red circle on the left\na blue square on the right\n")
    w["manifest"] = Path(__file__).resolve().parent.parent / "manifests" / "pixart-alpha.toml"
    w.update(bad_files(root, sorted(Path(w["captions"]).glob("*.parquet"))[0]))
    w.update(damaged_checkpoints(Path(w["run"]), root))
    return w
