"""Issue 12, training: checkpoints that recover themselves, no fresh run into an old run
directory, one writer per run directory, the checkpoint flags of `t2i-data train`."""

import json
import os
from pathlib import Path

import pytest
import torch

from shards.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("t2i-rec")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=50)
    write_simple_world(root / "captions", 128, rows_per_shard=64)
    return {"root": root, "captions": root / "captions", "features": root / "features", **models}


def tiny_cfg(world, **kw):
    from t2i.train import TrainConfig

    base = dict(preset="PixArt-tiny/2", resolution=16, vae=world["vae"], text_encoder=world["text_encoder"], max_tokens=16,
                text_dtype="float32", batch_size=32, steps=12, lr=1e-3, warmup_steps=5, grad_clip=1.0,
                checkpoint_every=4, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run(world, out, **kw):
    from t2i.stage import run_stage

    resume = kw.pop("resume", False)
    stop_after = kw.pop("stop_after", None)
    return run_stage(tiny_cfg(world, **kw), out, shards=None if resume else world["captions"], features=world["features"],
                 resume=resume, stop_after=stop_after, progress=False)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 12-step run: what every recovered run must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run(world, out)
    return {"losses": losses(out), "checkpoint": Path(r["checkpoint"])}


def assert_same_as_reference(out: Path, result: dict, reference: dict) -> None:
    from safetensors.torch import load_file

    assert result["step"] == 12
    assert losses(out) == reference["losses"]  # identical data order, noise, optimizer state
    a, b = load_file(reference["checkpoint"] / "ema.safetensors"), load_file(Path(result["checkpoint"]) / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_run_into_an_old_run_directory_is_refused(world, tmp_path):
    """Finding 2: a run without --resume into a directory with checkpoints lost its own checkpoints."""
    out = tmp_path / "run"
    run(world, out, steps=8)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"already holds checkpoints.*--resume.*fresh --out"):
        run(world, out, steps=3)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched


def test_rotation_sorts_by_step_and_keeps_what_this_run_wrote(tmp_path):
    from t2i.checkpoint import rotate

    ckdir = tmp_path / "checkpoints"
    for step in (5, 40, 60, 80, 9_000_000, 10_000_000):
        (ckdir / f"step-{step:07d}").mkdir(parents=True)
    rotate(ckdir, 10_000_000, keep=3)  # by number: 10_000_000 is newer than 9_000_000 although its name sorts first
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000080", "step-10000000", "step-9000000"]
    for step in (5, 40, 60):
        (ckdir / f"step-{step:07d}").mkdir()
    rotate(ckdir, 5, keep=1)  # a run at step 5 never deletes a checkpoint past its own step
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-0000005", "step-0000040", "step-0000060", "step-0000080",
                                                       "step-10000000", "step-9000000"]


def test_latest_never_dangles_for_a_reader(world, tmp_path):
    from t2i.checkpoint import LATEST, latest_checkpoint

    out = tmp_path / "run"
    run(world, out, steps=8)
    ckdir = out / "checkpoints"
    assert (ckdir / LATEST).read_text() == "step-0000008"
    (ckdir / LATEST).write_text("step-0000099")  # names a directory that does not exist
    assert latest_checkpoint(out).name == "step-0000008"
    (ckdir / LATEST).unlink()
    assert latest_checkpoint(out).name == "step-0000008"
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.parametrize("damage", ["model", "ema", "optimizer", "rng", "trainer_state"])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_valid(world, tmp_path, reference, capfd, damage):
    """Finding 3: a truncated file in the newest checkpoint blocked resume with a traceback."""
    out = tmp_path / "run"
    run(world, out, stop_after=8)  # checkpoints at 4 and 8
    newest = out / "checkpoints" / "step-0000008"
    f = newest / ("trainer_state.json" if damage == "trainer_state" else f"{damage}.safetensors")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run(world, out, resume=True)
    assert r["start_step"] == 4
    err = capfd.readouterr().err
    assert "warning: resuming from step-0000004 instead: damaged checkpoint(s) step-0000008" in err
    assert (out / "checkpoints" / "damaged-step-0000008").is_dir()  # kept for inspection, out of the way
    assert_same_as_reference(out, r, reference)


def test_no_valid_checkpoint_is_a_one_line_error(world, tmp_path):
    out = tmp_path / "run"
    run(world, out, steps=4)
    (out / "checkpoints" / "step-0000004" / "rng.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(UserError, match=r"no checkpoint in .* can be resumed: step-0000004 \(rng.safetensors is truncated"):
        run(world, out, resume=True)


def test_half_written_log_line_is_dropped_on_resume(world, tmp_path, reference, capfd):
    """Finding 3: a kill in the middle of a log line gave a JSONDecodeError on resume."""
    out = tmp_path / "run"
    run(world, out, stop_after=8)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 1, "lo')
    r = run(world, out, resume=True)
    assert r["start_step"] == 8
    assert "warning: dropped 1 half-written line(s)" in capfd.readouterr().err
    assert_same_as_reference(out, r, reference)


def test_second_train_on_one_run_directory_is_refused(world, tmp_path):
    from shards.lock import OutputLocked, output_lock

    out = tmp_path / "run"
    with output_lock(out, "train"):  # as if another train were running there
        with pytest.raises(OutputLocked, match=rf"in use by another train run on host .*pid {os.getpid()}"):
            run(world, out, steps=2)
    assert not (out / "checkpoints").exists()


def test_cli_checkpoint_flags_and_refusal(world, tmp_path):
    from typer.testing import CliRunner

    import cli

    out = tmp_path / "run"
    args = ["train", "--shards", str(world["captions"]), "--out", str(out), "--preset", "PixArt-tiny/2", "--resolution", "16",
            "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--batch-size", "32", "--steps", "9"]
    r = CliRunner().invoke(cli.app, [*args, "--checkpoint-every", "2", "--keep-checkpoints", "2"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == ["step-0000008", "step-0000009"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 2 and "--resume" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.app, [*args[:-1], "12", "--resume", "--checkpoint-every", "2"])
    assert r.exit_code == 0 and "trained to step 12" in r.output, r.output


def test_full_disk_during_a_checkpoint_is_one_line_and_resumable(world, tmp_path, monkeypatch):
    """ENOSPC in the middle of a checkpoint: one line, exit 2, the half-written checkpoint never
    counts, and --resume continues from the last whole one."""
    from safetensors import SafetensorError
    from typer.testing import CliRunner

    import cli
    from t2i import checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # the first checkpoint's four files fit, the second one's do not
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    out = tmp_path / "run"
    args = ["train", "--shards", str(world["captions"]), "--out", str(out), "--preset", "PixArt-tiny/2", "--resolution", "16",
            "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--batch-size", "32", "--steps", "6", "--checkpoint-every", "2"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}: no space left on the device") and "Traceback" not in r.output
    from t2i.checkpoint import latest_checkpoint

    assert latest_checkpoint(out).name == "step-0000002"
    monkeypatch.setattr(checkpoint, "save_file", real)
    r = CliRunner().invoke(cli.app, [*args, "--resume"])
    assert r.exit_code == 0 and "trained to step 6" in r.output, r.output
