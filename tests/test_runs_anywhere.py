"""Runs that work from any folder, exports that carry their own settings, checkpoints whose
silent corruption is caught (issue 30, defects 8, 9 and 12):
- a diffusers-only client, given the export folder alone (T2I_EXPORT.md's recipe run as written,
  with t2i unimportable), reproduces t2i's sampler to 1e-5, for a DDPM and a flow-matching run;
- sample and export of a run from another working directory; a checkpoint from before paths
  were recorded absolute still loads when its folder is above it;
- a flipped byte in a checkpoint's weights, size unchanged, is caught by its checksum and falls
  back to the previous checkpoint with one warning (resume, sample); damaged checkpoints count
  toward keep_checkpoints.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli

PROMPTS = ["a red circle on the left", "a blue square on the right"]
BLOCKED = ("t2i", "shards", "curate", "autolabel", "costs", "dataset_stats", "demo", "tiny", "cli")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models and caption shards under one folder, named by relative paths from it."""
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("anywhere")
    build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=30)
    write_simple_world(root / "captions", 32, rows_per_shard=16)
    return root


def train(out: str, **settings) -> None:
    """A stage trained from the world's folder with relative paths, as a user would; 16 caption
    tokens (not the pipeline's default of 120)."""
    from t2i.stage import run_stage
    from t2i.train import TrainConfig

    resume = settings.pop("resume", False)
    cfg = TrainConfig(preset="PixArt-tiny/2", resolution=16, vae="models/vae", text_encoder="models/t5", max_tokens=16,
                      text_dtype="float32", batch_size=16, warmup_steps=1, lr=1e-3, log_every=1, loader_workers=0, **settings)
    run_stage(cfg, out, shards="captions", resume=resume, progress=False)


@pytest.fixture(scope="module")
def runs(world):
    import os

    here = os.getcwd()
    os.chdir(world)
    try:
        train("ddpm", steps=4, checkpoint_every=2)
        train("flow", steps=2, checkpoint_every=2, objective="flow", flow_shift=2.0)
    finally:
        os.chdir(here)
    return {"ddpm": world / "ddpm", "flow": world / "flow"}


def test_checkpoints_record_absolute_model_paths(runs, world):
    state = json.loads((runs["ddpm"] / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["features"]["vae"] == str((world / "models" / "vae").resolve())
    assert state["config"]["text_encoder"] == str((world / "models" / "t5").resolve())


def test_sample_and_export_from_another_folder(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the folder the run was made in
    r = CliRunner().invoke(cli.app, ["sample", str(runs["ddpm"]), "--prompt", PROMPTS[0], "--out", "grid.png", "--steps", "3"])
    assert r.exit_code == 0 and (tmp_path / "grid.png").is_file(), r.output
    r = CliRunner().invoke(cli.app, ["export", str(runs["ddpm"]), "--out", "pipe"])
    assert r.exit_code == 0 and (tmp_path / "pipe" / "model_index.json").is_file(), r.output


def test_old_relative_paths_load_from_the_folders_above(runs, world, tmp_path, monkeypatch):
    """A checkpoint written before paths were absolute (relative to the folder the run was made
    in) still samples from elsewhere: the path is found from the run's own folder tree."""
    import shutil

    from t2i.checkpoint import write_checksums

    old = world / "old-run"
    shutil.copytree(runs["ddpm"], old)
    ck = old / "checkpoints" / "step-0000004"
    state = json.loads((ck / "trainer_state.json").read_text())
    state["features"].update(vae="models/vae", text_encoder="models/t5")
    (ck / "trainer_state.json").write_text(json.dumps(state))
    write_checksums(ck)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli.app, ["sample", str(old), "--prompt", PROMPTS[0], "--out", "grid.png", "--steps", "2"])
    assert r.exit_code == 0, r.output


def _recipe(folder: Path) -> str:
    """The Python block of the export's T2I_EXPORT.md, as written."""
    text = (folder / "T2I_EXPORT.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return block


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_diffusers_only_client_reproduces_our_sampler(runs, tmp_path, objective):
    from t2i.export import export, load_exported
    from t2i.pipeline import generate

    folder = export(runs[objective], tmp_path / "pipe")
    settings = json.loads((folder / "t2i_export.json").read_text())
    assert settings["max_sequence_length"] == 16 and settings["clean_caption"] is False
    assert settings["objective"]["kind"] == objective
    client = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)  # t2i cannot be imported
    client += _recipe(folder) + (f"\nimport numpy as np\nnp.save({str(tmp_path / 'client.npy')!r}, "
                                 f"sample({PROMPTS!r}, seed=3, output_type='np'))\n")
    r = subprocess.run([sys.executable, "-c", client], cwd=folder, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pipe, null = load_exported(folder, device="cpu")
    ours = generate(pipe, null, PROMPTS, steps=settings["num_inference_steps"], guidance=settings["guidance_scale"], seed=3,
                    output_type="np")
    theirs = np.load(tmp_path / "client.npy")
    assert theirs.shape == ours.shape == (2, 16, 16, 3)
    assert np.abs(theirs - ours).max() <= 1e-5


def _flip_a_weight_byte(path: Path) -> None:
    """One byte of the tensor data changed, the file's size and header intact."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0x5A
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_and_falls_back_with_one_warning(runs, world, tmp_path, monkeypatch, capfd):
    import shutil

    from t2i.recovery import check_safetensors

    run = tmp_path / "run"
    shutil.copytree(runs["ddpm"], run)
    newest = run / "checkpoints" / "step-0000004"
    _flip_a_weight_byte(newest / "ema.safetensors")
    check_safetensors(newest / "ema.safetensors")  # the header and the size alone see nothing wrong
    r = CliRunner().invoke(cli.app, ["sample", str(run), "--prompt", PROMPTS[0], "--out", str(tmp_path / "g.png"), "--steps", "2"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "using step-0000002 instead" in warnings[0] and "ema.safetensors does not match" in warnings[0]
    monkeypatch.chdir(world)
    capfd.readouterr()
    train(str(run), steps=6, checkpoint_every=2, keep_checkpoints=2, resume=True)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "resuming from step-0000002 instead" in warnings[0], warnings
    # the damaged checkpoint was set aside, then counted toward --keep-checkpoints 2 and rotated away
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step-0000004", "step-0000006"]


def test_rotation_counts_damaged_checkpoints(tmp_path):
    from t2i.checkpoint import rotate

    ckdir = tmp_path / "checkpoints"
    for name in ("step-0000002", "damaged-step-0000004", "step-0000004", "step-0000006"):
        (ckdir / name).mkdir(parents=True)
    rotate(ckdir, 6, keep=2)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000004", "step-0000006"]


def test_a_flipped_bit_in_a_shard_is_one_line(tmp_path):
    """Shards carry Parquet page checksums: a changed byte in a page is an error naming the shard,
    not wrong rows."""
    import pyarrow.parquet as pq

    from shards import CAPTION_SCHEMA, ShardWriter, iter_batches
    from shards.errors import UserError

    w = ShardWriter(tmp_path / "s", rows_per_shard=100)
    w.add_many({"key": f"k{i}", "caption": f"caption number {i}" * 4} for i in range(100))
    w.close()
    (shard,) = sorted((tmp_path / "s").glob("*.parquet"))
    chunk = pq.ParquetFile(shard).metadata.row_group(0).column(CAPTION_SCHEMA.get_field_index("caption"))
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size - 2] ^= 0xFF  # inside the page's payload
    shard.write_bytes(bytes(data))
    assert pq.ParquetFile(shard).metadata.num_rows == 100  # the footer is whole: only the checksum can tell
    with pytest.raises(UserError, match=rf"{shard.name} is damaged or not a Parquet shard .*CRC"):
        list(iter_batches(tmp_path / "s"))
