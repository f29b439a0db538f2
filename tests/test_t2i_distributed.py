"""Two processes on CPU (torchrun -> gloo ranks that accelerate's Accelerator picks up) train the
tiny preset through the real CLI: same per-step losses as one process with the same global batch,
every sample exactly once per epoch across ranks, checkpoints only from rank 0, and a resume of
the 2-rank checkpoint on 1 process (changed world size) that continues the same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """
name = "ddp-cpu"
[defaults]
preset = "PixArt-tiny/2"
resolution = 16
max_tokens = 16
text_dtype = "float32"
global_batch = 16
lr = 1e-3
warmup_steps = 2
grad_clip = 1.0
checkpoint_every = 3
keep_checkpoints = 10
log_every = 1
seed = 5
threads = 1
trace_keys = true
[[stages]]
name = "s"
steps = 10
"""
# float sums in another order (DDP's gradient all-reduce, per-rank loss means): the losses agree
# to ~1e-7 relative (measured 1.2e-7); 1e-5 leaves room for Adam amplifying that over 10 steps.
RTOL = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    root = tmp_path_factory.mktemp("ddp")
    models = build_tiny_models(root / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(root / "captions", 64, rows_per_shard=32)  # one epoch = 4 global batches of 16
    (root / "m.toml").write_text(MANIFEST)
    return {"root": root, **models}


def cli_args(world, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--manifest", str(world["root"] / "m.toml"), "--shards", str(world["root"] / "captions"), "--out", str(out),
            "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--steps", str(steps), *extra]


def torchrun(args: list[str], nproc: int = 2, **env_vars: str) -> None:
    """The real console script on `nproc` gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(sys.executable).parent / "t2i-data"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The 1-process run, 10 steps of global batch 16."""
    import cli

    out = tmp_path_factory.mktemp("one")
    r = CliRunner().invoke(cli.app, cli_args(world, out, 10))
    assert r.exit_code == 0, r.output
    return out


def log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "s" / "log.jsonl").read_text().splitlines()]


def trace(run: Path, rank: int) -> list[dict]:
    return [json.loads(l) for l in (run / "s" / "trace" / f"rank-{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_match_one_and_resume_on_one(world, reference, tmp_path):
    import cli

    ref = log(reference)

    # 2 gloo ranks x 8 through the real console script, 6 steps
    torchrun(cli_args(world, tmp_path / "two", 6))
    two = log(tmp_path / "two")
    assert [x["step"] for x in two] == list(range(1, 7))
    st = json.loads((tmp_path / "two" / "s" / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and st["global_batch"] == 16 and (st["epoch"], st["batch_in_epoch"]) == (1, 2)

    # resume the 2-rank checkpoint in 1 process (changed world size) up to step 10
    r = CliRunner().invoke(cli.app, cli_args(world, tmp_path / "two", 10))
    assert r.exit_code == 0, r.output
    both = log(tmp_path / "two")
    assert [x["step"] for x in both] == list(range(1, 11))
    a = np.array([x["loss"] for x in ref])
    b = np.array([x["loss"] for x in both])
    assert np.isfinite(b).all() and len(set(b.round(6))) > 5  # a real, moving loss
    print("max relative loss difference, 2 ranks vs 1:", float(np.max(np.abs(b - a) / np.abs(a))))
    np.testing.assert_allclose(b, a, rtol=RTOL)

    # the same updates: final weights of (2 ranks -> resumed on 1) equal the 1-process run's
    from safetensors.torch import load_file

    wa = load_file(reference / "s" / "checkpoints" / "step-0000010" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "s" / "checkpoints" / "step-0000010" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)

    # exactly once per epoch across ranks: epochs 0 and 1 are complete (1 is split over the world-size change)
    t0, t1 = trace(tmp_path / "two", 0), trace(tmp_path / "two", 1)
    batches = [x for x in t0 + t1 if "keys" in x]
    for epoch in (0, 1):
        keys = [k for x in batches if x["epoch"] == epoch for k in x["keys"]]
        assert len(keys) == 64 and len(set(keys)) == 64
    two_rank = [x for x in batches if x["world"] == 2]
    assert {x["rank"] for x in two_rank} == {0, 1} and all(len(x["keys"]) == 8 for x in two_rank)
    assert all(len(x["keys"]) == 16 for x in batches if x["world"] == 1)
    # rank r of global batch g holds positions r*8..r*8+7 of the batch the 1-process run took whole
    one = {(x["epoch"], x["batch"]): x["keys"] for x in trace(reference, 0) if "keys" in x}
    for x in two_rank:
        assert x["keys"] == one[(x["epoch"], x["batch"])][x["rank"] * 8:(x["rank"] + 1) * 8]

    # checkpoints only from rank 0
    saves = [x for x in t0 + t1 if x.get("event") == "checkpoint"]
    assert saves and all(x["rank"] == 0 for x in saves)
    assert [x["step"] for x in saves] == [3, 6, 9, 10]
    assert not any(x.get("event") for x in t1)


@pytest.mark.slow
def test_fsdp_two_ranks_continue_the_one_process_run(world, reference, tmp_path):
    """1 process (steps 1-3) -> 2 FSDP ranks (4-6: weights, EMA and AdamW moments sharded) -> 1
    process without FSDP (7-10): the same losses and weights as the 1-process reference, so the
    sharded run loads a whole checkpoint and writes a whole one."""
    import cli
    from safetensors.torch import load_file

    run = tmp_path / "mixed"
    r = CliRunner().invoke(cli.app, cli_args(world, run, 3))
    assert r.exit_code == 0, r.output
    torchrun(cli_args(world, run, 6, "--fsdp"))
    st = json.loads((run / "s" / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert st["config"]["fsdp"] is True and st["world_size"] == 2
    r = CliRunner().invoke(cli.app, cli_args(world, run, 10, "--no-fsdp"))
    assert r.exit_code == 0, r.output

    a = np.array([x["loss"] for x in log(reference)])
    b = np.array([x["loss"] for x in log(run)])
    assert [x["step"] for x in log(run)] == list(range(1, 11))
    held = {x["step"]: x["params_local"] for x in log(run)}
    assert held[1] == held[10] and held[5] < 0.55 * held[1]  # rank 0 held about half the parameters under FSDP
    print("max relative loss difference, FSDP chain vs 1 process:", float(np.max(np.abs(b - a) / np.abs(a))))
    np.testing.assert_allclose(b, a, rtol=RTOL)
    for which in ("model", "ema"):
        wa = load_file(reference / "s" / "checkpoints" / "step-0000010" / f"{which}.safetensors")
        wb = load_file(run / "s" / "checkpoints" / "step-0000010" / f"{which}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # the FSDP checkpoint holds whole tensors, the same as a 1-process one
    w6 = load_file(run / "s" / "checkpoints" / "step-0000006" / "model.safetensors")
    assert {k: v.shape for k, v in w6.items()} == {k: v.shape for k, v in wa.items()}
    o6 = load_file(run / "s" / "checkpoints" / "step-0000006" / "optimizer.safetensors")
    oa = load_file(reference / "s" / "checkpoints" / "step-0000006" / "optimizer.safetensors")
    assert {k: v.shape for k, v in o6.items()} == {k: v.shape for k, v in oa.items()}


@pytest.mark.slow
def test_fsdp_gradient_accumulation_matches_one_process(world, tmp_path):
    """Two micro-batches per step: the first skips the FSDP reduce-scatter, the second does it.
    FSDP is asked for the way `accelerate launch --use_fsdp` asks (ACCELERATE_USE_FSDP=true)."""
    import cli

    args = ("--global-batch", "8", "--grad-accum", "2")
    r = CliRunner().invoke(cli.app, cli_args(world, tmp_path / "one", 4, *args, "--fsdp"))  # 1 process: nothing to shard
    assert r.exit_code == 0, r.output
    torchrun(cli_args(world, tmp_path / "fsdp", 4, *args), ACCELERATE_USE_FSDP="true")
    a = np.array([x["loss"] for x in log(tmp_path / "one")])
    b = np.array([x["loss"] for x in log(tmp_path / "fsdp")])
    assert len(a) == len(b) == 4
    assert log(tmp_path / "fsdp")[0]["params_local"] < 0.55 * log(tmp_path / "one")[0]["params_local"]  # sharded
    np.testing.assert_allclose(b, a, rtol=RTOL)


def test_resume_with_another_global_batch_is_refused(world, tmp_path):
    from shards.errors import UserError
    from t2i.manifest import parse_manifest
    from t2i.stage import run_stage
    from t2i.train import TrainConfig, train

    cfg = parse_manifest(MANIFEST).stages[0].config
    kw = {**cfg.__dict__, "vae": world["vae"], "text_encoder": world["text_encoder"], "steps": 2, "trace_keys": False}
    run_stage(TrainConfig(**kw), tmp_path / "r", shards=world["root"] / "captions", progress=False)
    with pytest.raises(UserError, match="global batch of 16.*set global_batch = 16"):
        train(TrainConfig(**{**kw, "global_batch": 8, "steps": 4}), tmp_path / "r", resume=True, progress=False)
    from t2i.train import per_process_batch

    with pytest.raises(UserError, match="not divisible by 2 processes"):
        per_process_batch(TrainConfig(global_batch=15), 2)
    assert per_process_batch(TrainConfig(global_batch=16), 2) == (8, 16)
    assert per_process_batch(TrainConfig(batch_size=8), 2) == (8, 16)


def test_global_batches_do_not_depend_on_world_size(tmp_path):
    from t2i.data import StreamingFeatureDataset

    ds = StreamingFeatureDataset.__new__(StreamingFeatureDataset)
    ds.buckets = {(16, 16): np.arange(0, 37), (8, 32): np.arange(37, 50)}
    one, two = ds.global_batches(0, 7, 8, 1), ds.global_batches(0, 7, 8, 2)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert b.tolist() == a[: len(a) - len(a) % 2].tolist()  # only a bucket's tail is cut to a multiple of 2
    ranks = [StreamingFeatureDataset.rank_slice(b, r, 2) for b in two for r in (0, 1)]
    flat = np.concatenate(ranks)
    assert len(flat) == len(set(flat.tolist())) == 50 - 1 - 1  # each bucket's odd sample waits


LEVERS = MANIFEST.replace("trace_keys = true", """trace_keys = true
objective = "flow"
timestep_density = "logit_normal"
loss_weighting = "cosmap"
token_drop = 0.5
token_drop_start = 0
token_drop_end = 1
val_fraction = 0.25
val_every = 2""")


@pytest.mark.slow
def test_levers_give_the_same_run_on_two_processes(world, tmp_path):
    """Flow matching, token routing and the validation loss on 2 gloo ranks and on 1 process:
    the same training losses and validation losses (each sample's noise, timestep and routed
    tokens are its own; the held-out keys and their fixed noise are the same on every rank), no
    held-out key in any rank's batches; then the 2-rank run resumed on 1 process continues it."""
    import cli

    (world["root"] / "levers.toml").write_text(LEVERS)

    def args(out: Path, steps: int) -> list[str]:
        return [*cli_args(world, out, steps)[:2], str(world["root"] / "levers.toml"), *cli_args(world, out, steps)[3:]]

    r = CliRunner().invoke(cli.app, args(tmp_path / "one", 6))
    assert r.exit_code == 0, r.output
    torchrun(args(tmp_path / "two", 4))
    r = CliRunner().invoke(cli.app, args(tmp_path / "two", 6))  # the step-4 checkpoint resumed on 1 process
    assert r.exit_code == 0, r.output
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert [x["step"] for x in one] == [x["step"] for x in two] == list(range(1, 7))
    np.testing.assert_allclose([x["loss"] for x in two], [x["loss"] for x in one], rtol=RTOL)
    val_one = [(x["step"], x["val_loss"]) for x in one if "val_loss" in x]
    val_two = [(x["step"], x["val_loss"]) for x in two if "val_loss" in x]
    assert [s for s, _ in val_one] == [s for s, _ in val_two] == [2, 4, 6]
    print("max relative validation-loss difference, 2 ranks vs 1:",
          max(abs(b - a) / abs(a) for (_, a), (_, b) in zip(val_one, val_two)))
    np.testing.assert_allclose([v for _, v in val_two], [v for _, v in val_one], rtol=RTOL)
    keys = {k for rank in (0, 1) for x in trace(tmp_path / "two", rank) for k in x.get("keys", [])}
    keys |= {k for x in trace(tmp_path / "one", 0) for k in x.get("keys", [])}
    import pyarrow.parquet as pq

    from t2i.data import Holdout
    from t2i.noise import hash_strings

    every = [k for f in sorted((world["root"] / "captions").glob("*.parquet")) for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    held = {k for k, h in zip(every, Holdout(0.25).select(hash_strings(every))) if h}
    assert 8 <= len(held) <= 24 and keys == set(every) - held  # every other key trained, no held-out one


@pytest.mark.slow
def test_two_ranks_encode_ids_on_demand_as_one_process_reads_features(world, reference, tmp_path):
    """text_dtype ids on 2 gloo ranks: each rank encodes its own slice with its own frozen T5
    (t2i.text_ondemand); the losses are the 1-process float32-features run's (float32 on both sides)."""
    torchrun(cli_args(world, tmp_path / "ids", 4, "--text-dtype", "ids"))
    a, b = np.array([x["loss"] for x in log(reference)][:4]), np.array([x["loss"] for x in log(tmp_path / "ids")])
    assert len(b) == 4 and np.isfinite(b).all()
    print("max relative loss difference, ids on 2 ranks vs float32 features on 1:", float(np.max(np.abs(b - a) / np.abs(a))))
    np.testing.assert_allclose(b, a, rtol=RTOL)
