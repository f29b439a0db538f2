"""Chaos suite: random `kill -9` trials of every writing job, plus the specific faults of issue 12.

For each job (caption on the tiny random LLaVA with the transformers backend, features with the
tiny VAE + T5, train on the tiny preset through a manifest) one clean run is timed first (for
train it is also the reference). Each trial then starts the job in a fresh output directory,
kills it with SIGKILL at a random moment (15-100% of the clean run's time; in a quarter of the
trials the rerun is killed too), reruns the same command to completion and counts:
  lost       keys (caption, features) or log steps (train) missing after the rerun;
  duplicated rows (or log lines) beyond one per key (step);
  resume equal  (train) EMA weights and logged losses identical to the uninterrupted run.
The specific faults (a second run on a busy --out, damaged checkpoints, a half-written log line,
a fresh train into an old run directory, a corrupt Parquet source, --out under a file) are run
once each and must end as the issue asks.

    .venv/bin/python benchmarks/chaos_bench.py --trials 20      # writes BENCHMARKS.md "chaos_bench"
    .venv/bin/python benchmarks/chaos_bench.py --trials 2 --no-write
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
CLI = [sys.executable, str(ROOT / "cli.py")]
N_IMAGES = 24
N_CAPTIONS = 96
TRAIN_STEPS = 12


@dataclass
class Job:
    """One writing job: the command for an output directory, and what its output holds."""

    name: str
    command: Callable[[Path], list[str]]
    committed: Callable[[Path], bool]  # anything durable written yet (for the report)
    check: Callable[[Path], dict]  # {"lost", "duplicated", "equal"}
    progress: Callable[[Path], int]  # units written so far (shards, log lines): where kills are aimed


@dataclass
class JobResult:
    trials: int = 0
    double_kills: int = 0
    killed_after_commit: int = 0
    finished_before_kill: int = 0
    lost: int = 0
    duplicated: int = 0
    unequal: int = 0
    failed_reruns: list[str] = field(default_factory=list)
    clean_s: float = 0.0
    first_commit_s: float = 0.0
    units: int = 0  # progress units of a clean run


# ---- the world ----------------------------------------------------------------------------------

def build_world(root: Path) -> dict:
    """Tiny LLaVA, images to caption, tiny VAE + T5, caption shards to encode, a train manifest."""
    import numpy as np
    from PIL import Image

    from tiny.llava import build_tiny_llava
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    world = {"llava": build_tiny_llava(root / "llava", seed=0), **build_tiny_models(root / "t2i-models", simple_corpus(), vae_fit_steps=50)}
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(buf, "JPEG")
        (images / f"sa_{i}.jpg").write_bytes(buf.getvalue())
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    world["images"], world["captions"] = images, root / "captions"
    write_simple_world(world["captions"], N_CAPTIONS, rows_per_shard=32)
    world["manifest"] = root / "chaos.toml"
    world["manifest"].write_text(
        'name = "chaos"\n[defaults]\npreset = "PixArt-tiny/2"\nresolution = 16\nmax_tokens = 16\ntext_dtype = "float32"\n'
        f'batch_size = 16\nsteps = {TRAIN_STEPS}\nlr = 1e-3\nwarmup_steps = 5\ngrad_clip = 1.0\ncheckpoint_every = 2\n'
        'keep_checkpoints = 3\nlog_every = 1\nseed = 3\n[[stages]]\nname = "s"\ninit = "scratch"\n')
    return world


def _keys(directory: Path) -> list[str]:
    import pyarrow.parquet as pq

    from shards.reader import complete_shards

    return [k for s in complete_shards(directory) for k in pq.read_table(s, columns=["key"]).column("key").to_pylist()]


def _count(keys: list[str], expected: set[str]) -> dict:
    return {"lost": len(expected - set(keys)), "duplicated": len(keys) - len(set(keys)), "equal": None}


def _features_dir(out: Path) -> Path:
    found = [p for p in out.iterdir() if (p / "config.json").exists()] if out.is_dir() else []
    return found[0] if found else out / "none"


def _ema(run: Path):
    from safetensors.torch import load_file

    from t2i.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run) / "ema.safetensors"))


def _log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]


def make_jobs(world: dict, reference: dict) -> list[Job]:
    """The three writing jobs; `reference` is filled with the clean train run's results."""
    import torch

    caption_keys = {f"images/sa_{i}.jpg" for i in range(N_IMAGES)} | {"images/broken.jpg"}

    def train_check(out: Path) -> dict:
        steps = [r["step"] for r in _log(out / "s")]
        ema, ref = _ema(out / "s"), reference["ema"]
        equal = ema.keys() == ref.keys() and all(torch.equal(ema[k], ref[k]) for k in ref)
        equal = equal and [r["loss"] for r in _log(out / "s")] == reference["losses"]
        return {"lost": len(set(range(1, TRAIN_STEPS + 1)) - set(steps)), "duplicated": len(steps) - len(set(steps)), "equal": equal}

    return [
        Job("caption", lambda out: [*CLI, "caption", "--src", str(world["images"]), "--out", str(out), "--model", str(world["llava"]),
                                    "--backend", "transformers", "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2",
                                    "--shard-size", "2", "--workers", "1", "--no-progress"],
            lambda out: bool(list(out.glob("*.done"))), lambda out: _count(_keys(out), caption_keys),
            lambda out: len(list(out.glob("*.done")))),
        Job("features", lambda out: [*CLI, "features", "--shards", str(world["captions"]), "--out", str(out), "--vae", world["vae"],
                                     "--text-encoder", world["text_encoder"], "--resolution", "16", "--max-tokens", "16",
                                     "--text-dtype", "float32", "--batch-size", "8", "--shard-size", "8"],
            lambda out: bool(list(_features_dir(out).glob("*.done"))), lambda out: _count(_keys(_features_dir(out)), set(_keys(world["captions"]))),
            lambda out: len(list(_features_dir(out).glob("*.done")))),
        Job("train", lambda out: [*CLI, "train", "--manifest", str(world["manifest"]), "--shards", str(world["captions"]), "--out", str(out),
                                  "--vae", world["vae"], "--text-encoder", world["text_encoder"]],
            lambda out: (out / "s" / "checkpoints").is_dir() and any(p.name.startswith("step-") for p in (out / "s" / "checkpoints").iterdir()),
            train_check, lambda out: _lines(out / "s" / "log.jsonl")),
    ]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


# ---- trials -------------------------------------------------------------------------------------

def run_to_end(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def kill_during(job: Job, out: Path, rng: random.Random, res: JobResult) -> bool:
    """Start the job and SIGKILL it at a random point of its writing: after a random number u of
    progress units (shards, log lines) are written, plus a random part of one unit's time; u = 0:
    a random moment before its first unit. Aimed by progress, not by the clock, so the kills land
    while it writes whatever the machine's load. False when it finished first."""
    done = job.progress(out)
    u = rng.randrange(done, max(res.units, done + 1))
    unit_s = (res.clean_s - res.first_commit_s) / max(res.units, 1)
    p = subprocess.Popen(job.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while u > done and p.poll() is None and job.progress(out) < u:
        time.sleep(0.01)
    try:
        p.wait(timeout=rng.uniform(0, res.first_commit_s if u == done else unit_s))
        return False
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        return True


def trial(job: Job, out: Path, rng: random.Random, res: JobResult) -> None:
    kills = 2 if rng.random() < 0.25 else 1
    res.trials += 1
    res.double_kills += kills == 2
    for _ in range(kills):
        if not kill_during(job, out, rng, res):
            res.finished_before_kill += 1
            break
    res.killed_after_commit += job.committed(out)
    r = run_to_end(job.command(out))
    if r.returncode != 0:
        res.failed_reruns.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        return
    c = job.check(out)
    res.lost += c["lost"]
    res.duplicated += c["duplicated"]
    res.unequal += c["equal"] is False


def clean_run(job: Job, out: Path, res: JobResult) -> None:
    """Time an uninterrupted run, and when its first output became durable."""
    t = time.perf_counter()
    p = subprocess.Popen(job.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while p.poll() is None:
        if not res.first_commit_s and job.committed(out):
            res.first_commit_s = time.perf_counter() - t
        time.sleep(0.02)
    res.clean_s = time.perf_counter() - t
    res.first_commit_s = res.first_commit_s or res.clean_s
    res.units = job.progress(out)
    if p.returncode != 0:
        raise RuntimeError(f"clean {job.name} run failed: {p.stderr.read()[-2000:]}")


# ---- the specific faults ------------------------------------------------------------------------

def _second_run_refused(job: Job, out: Path) -> tuple[bool, str]:
    """Start `job`, pause it once it holds its output's lock, run it again on the same --out, resume it."""
    from shards.lock import LOCK_FILE

    first = subprocess.Popen(job.command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        lock = (_features_dir(out) if job.name == "features" else out / "s" if job.name == "train" else out) / LOCK_FILE
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    # the first run is paused while it holds the lock: a short job would otherwise finish before
    # the second has started up, and the second would find a finished output, not a busy one
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run_to_end(job.command(out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=600)
    c = job.check(out)
    ok = second.returncode == 2 and "in use by another" in second.stderr and first.returncode == 0 and c["lost"] == c["duplicated"] == 0
    seen = second.stderr.strip().splitlines()[-1] if second.stderr.strip() else f"exit {second.returncode}"
    if not ok:  # say why: the first run's exit status and what its output holds
        seen = f"first run: exit {first.returncode}, lost {c['lost']}, duplicated {c['duplicated']}; second: {seen}"
    return ok, seen


def _damaged_resume(job: Job, ref_run: Path, out: Path, damage: Callable[[Path], None]) -> tuple[bool, str]:
    shutil.copytree(ref_run, out)
    damage(out / "s")
    r = run_to_end(job.command(out))
    c = job.check(out) if r.returncode == 0 else {"equal": False}
    warning = next((l for l in r.stderr.splitlines() if l.startswith("warning:")), r.stderr.strip()[-200:])
    return r.returncode == 0 and c["equal"] is True and c["lost"] == c["duplicated"] == 0, warning


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def specific_faults(world: dict, jobs: dict[str, Job], ref_run: Path, root: Path) -> list[tuple[str, bool, str]]:
    """(fault, handled as the issue asks, what the user saw)."""
    rows = []
    for name in ("caption", "features", "train"):
        ok, seen = _second_run_refused(jobs[name], root / f"busy-{name}")
        rows.append((f"second {name} run on a busy output", ok, seen))
    for what in ("model", "ema", "optimizer", "rng"):
        ok, seen = _damaged_resume(jobs["train"], ref_run, root / f"damaged-{what}",
                                   lambda run, w=what: _truncate(run / "checkpoints" / f"step-{TRAIN_STEPS:07d}" / f"{w}.safetensors"))
        rows.append((f"truncated {what}.safetensors in the newest checkpoint", ok, seen))
    ok, seen = _damaged_resume(jobs["train"], ref_run, root / "damaged-state",
                               lambda run: _truncate(run / "checkpoints" / f"step-{TRAIN_STEPS:07d}" / "trainer_state.json"))
    rows.append(("truncated trainer_state.json in the newest checkpoint", ok, seen))

    def half_line(run: Path) -> None:
        for ck in (f"step-{TRAIN_STEPS:07d}", f"step-{TRAIN_STEPS - 2:07d}"):
            shutil.rmtree(run / "checkpoints" / ck)  # back to step 8; `latest` now dangles
        with open(run / "log.jsonl", "a") as f:
            f.write('{"step": 13, "lo')

    ok, seen = _damaged_resume(jobs["train"], ref_run, root / "half-line", half_line)
    rows.append(("half-written log line, dangling `latest`", ok, seen or "resumed silently"))
    r = run_to_end([*CLI, "train", "--shards", str(world["captions"]), "--out", str(ref_run / "s"), "--preset", "PixArt-tiny/2",
                    "--resolution", "16", "--vae", world["vae"], "--text-encoder", world["text_encoder"], "--steps", "3"])
    rows.append(("fresh train into an old run directory", r.returncode == 2 and "--resume" in r.stderr, r.stderr.strip()))
    bad = root / "bad.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    (root / "a-file").write_text("x")
    for fault, src, out in (("corrupt .parquet source", bad, root / "o1"), ("--out under a file", world["images"], root / "a-file" / "out")):
        r = run_to_end([*CLI, "caption", "--src", str(src), "--out", str(out), "--model", "no/such/model"])
        lines = r.stderr.strip().splitlines()
        rows.append((fault, r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr.strip()))
    return rows


# ---- the whole suite ------------------------------------------------------------------------------

def run_rounds(trials: int, trial_of: dict[str, Callable[[Path, JobResult], None]], results: dict[str, JobResult], root: Path,
               status: Callable[[JobResult], str], log: Callable[[str], None], deadline: float | None,
               on_round: Callable[[], None] | None) -> None:
    """Rounds of one trial per job (so all jobs have as many when time runs out), each in
    ROOT/<job>-<round>, removed after; no round starts after `deadline` (time.time()). After each
    round: one log line of every job's `status`, then `on_round`."""
    for i in range(trials):
        if deadline is not None and time.time() > deadline:
            log(f"deadline reached after {i} trials per job")
            return
        for name, trial_one in trial_of.items():
            trial_one(root / f"{name}-{i}", results[name])
            shutil.rmtree(root / f"{name}-{i}", ignore_errors=True)
        log(f"round {i + 1}: " + "; ".join(f"{n}: {status(r)}" for n, r in results.items()))
        if on_round:
            on_round()


def run_chaos(trials: int, root: Path, seed: int = 0, faults: bool = True, log: Callable[[str], None] = print,
              deadline: float | None = None, on_round: Callable[[dict], None] | None = None) -> dict:
    """{"jobs": {name: JobResult}, "faults": [(fault, ok, seen)]}. Trials go round-robin over the
    jobs (so all have as many when time runs out); no new round starts after `deadline`
    (time.time()); `on_round` sees the result so far after each round."""
    world = build_world(root)
    reference: dict = {}
    jobs = make_jobs(world, reference)
    rng = random.Random(seed)
    result: dict = {"jobs": {j.name: JobResult() for j in jobs}, "faults": []}
    for job in jobs:
        clean_run(job, root / f"clean-{job.name}", result["jobs"][job.name])
    run = root / "clean-train" / "s"
    reference.update(ema=_ema(run), losses=[r["loss"] for r in _log(run)])
    run_rounds(trials, {j.name: (lambda out, res, j=j: trial(j, out, rng, res)) for j in jobs}, result["jobs"], root,
               lambda r: f"lost {r.lost} dup {r.duplicated} unequal {r.unequal} failed {len(r.failed_reruns)}", log, deadline,
               (lambda: on_round(result)) if on_round else None)
    if faults:
        result["faults"] = specific_faults(world, {j.name: j for j in jobs}, root / "clean-train", root)
    return result


def render(result: dict, trials: int) -> str:
    lines = [
        f"Random `kill -9` trials ({trials} per job; in about a quarter the rerun is killed too), then the same command run to the end.",
        "Kill moments are aimed by progress: after a random number of written units (caption/features: shards of 2/8 rows,",
        "train: log lines, one per step; checkpoint every 2 steps), plus a random part of one unit's time; or before the",
        "first unit. `finished first`: the run ended before its kill (not counted as a kill). `lost`/`duplicated`: keys (caption, features) or",
        "log steps (train) missing / beyond one each after the rerun. Train: EMA weights and every logged loss compared",
        "with an uninterrupted run (`torch.equal`, bit for bit).", "",
        "| job | trials | double kills | finished first | kills after first commit | lost | duplicated | resume equal | failed reruns | clean run s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["jobs"].items():
        equal = f"{r.trials - r.unequal - len(r.failed_reruns)}/{r.trials}" if name == "train" else "n/a"
        lines.append(f"| {name} | {r.trials} | {r.double_kills} | {r.finished_before_kill} | {r.killed_after_commit} | {r.lost} | "
                     f"{r.duplicated} | {equal} | {len(r.failed_reruns)} | {r.clean_s:.1f} |")
    if result["faults"]:
        lines += ["", "| specific fault | handled | what the user sees |", "|---|---|---|"]
        for fault, ok, seen in result["faults"]:
            lines.append(f"| {fault} | {'yes' if ok else 'NO'} | `{seen.replace('|', '/')[:300]}` |")
    lines += ["", f"Run: `python benchmarks/chaos_bench.py --trials {trials}` (trials go round-robin over the jobs)."]
    return "\n".join(lines)


def chaos_main(section: str, doc: str, run: Callable[..., dict], render_result: Callable[[dict, int], str],
               jobs_of: Callable[[dict], dict]) -> None:
    """The command line of a chaos bench: run the trials, write the `section` of BENCHMARKS.md
    after every round (a stopped run still leaves its figures) and at the end, print the table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="random kills per job")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None, help="start no new round of trials after this long")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    deadline = time.time() + 60 * args.minutes if args.minutes else None

    def body(result: dict) -> str:
        return render_result(result, min(r.trials for r in jobs_of(result).values()))

    def record(result: dict) -> None:
        if not args.no_write:
            from benchmarks._report import write_section

            write_section(section, body(result))

    with tempfile.TemporaryDirectory(prefix=f"{section}-") as tmp:
        result = run(args.trials, Path(tmp), args.seed, deadline=deadline, on_round=record)
    record(result)
    print(body(result))


def main() -> None:
    chaos_main("chaos_bench", __doc__, run_chaos, render, lambda result: result["jobs"])


if __name__ == "__main__":
    main()
