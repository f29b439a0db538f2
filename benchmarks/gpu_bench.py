"""GPU benchmark (issue 17): the trainer, the data path, the features encoders and the captioner,
in one run on one device, in priority order under a time budget.

Parts, in the order they run (each is skipped when what is left of `--budget` is less than its
estimate; the JSON is rewritten after every part, so a run cut short keeps what it measured):

  ceilings            bf16 matmul rate and copy bandwidth measured on this device
  ours-compile        t2i.train.TrainStep, PixArt-XL/2 at 256 px, 120 T5 tokens: bf16 autocast,
                      SDPA, fused AdamW, EMA, regional torch.compile of the blocks
  profile             torch.profiler over that step: the kernels that dominate
  ours-compile-bf16p  ours-compile on bf16 weights with fp32 masters (param_dtype = bfloat16)
  ours-compile-ema4   ours-compile with the EMA averaged on every 4th step only (ema_every = 4)
  ours-compile-fp8    ours-compile with float8 matmuls in the blocks (float8 = true, torchao)
  ours-compile-bf16p-ema4-fp8  the three together
  ours-compile-flow / -repa / -drop50   the training levers on that step: flow matching, REPA on
                      stored teacher tokens, token dropping at 50% (MFU from the FLOPs they do)
  features-layout     the features job's VAE path (FeatureEncoder): NCHW, channels_last, compiled, both
  features-t5-compile the features job's T5 path eager vs compile_text, storing float16 and int8
  features-compact    int8 text quantised on the device (the job) vs on the host; the job's whole batch, float16 vs int8
  datapath            feature shards -> batches -> device, alone and feeding the step: does the GPU wait?
  datapath-compact    the streaming loader on float16 vs int8 text features feeding the step: does the GPU wait?
  ours-eager          the same step without compile
  reference           the plain loop: fp32 eager, MSE only, unfused AdamW
  ours-compile-ckpt   ours-compile with gradient checkpointing
  max-batch           largest batch that fits (eager bf16, with and without checkpointing), peak memory
  features            SD-VAE encoder and T5-XXL encoder (real sizes, random weights), bf16: images/s
  captioner           benchmarks/gpu_captioner.py: LLaVA-1.5-7B-shaped, transformers backend
  ours-compile-full   whole-model torch.compile, to compare with the regional compile
  ours-compile-512    the step at 512 px (64x64 latents), batch / 4

    python benchmarks/gpu_bench.py --budget 420            # on a GPU: writes $OUT/gpu_bench.json
    python benchmarks/gpu_bench.py --only issue33 --budget 540   # issue 33's parts (RUNS), ~550 s of estimates
    python benchmarks/gpu_bench.py --cpu-smoke              # tiny preset on CPU: checks the harness
    python benchmarks/gpu_bench.py --report run1.json,run2.json  # BENCHMARKS.md "gpu_bench" from a GPU run's JSON

A CPU run never writes BENCHMARKS.md (it would overwrite GPU figures with meaningless ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_train as gt  # noqa: E402
from t2i.models import device_peak_flops  # noqa: E402

# Written before the first GPU run (METHOD.md: predict, change, measure, look back). XL/2 at 256 px,
# batch 64: 57.2 TFLOP per step (matmuls, fwd + bwd); H100 datasheet 989 TFLOP/s bf16 dense.
PREDICTIONS = {
    "reference": "fp32 with TF32 off runs on the CUDA cores (~67 TFLOP/s datasheet): ~1.2 s/step, ~50 img/s, MFU ~5%",
    "ours-eager": "matmuls on tensor cores, but ~30 unfused elementwise passes per block (adaLN modulate, norms, GELU, "
                  "residuals) over 38 MB bf16 activations each, ~30 ms/step of memory traffic: ~150 ms/step, ~35% MFU",
    "ours-compile": "compile fuses the elementwise chains (about a third of their traffic left): ~115 ms/step, "
                    "~45-50% MFU (~500 img/s)",
    "ours-compile-ckpt": "recomputes the forward (+1/3 FLOPs, not counted in MFU): ~0.75x the images/s of ours-compile",
    "max-batch": "weights+grads+AdamW+EMA = 12 GB; ~0.35-0.45 GB of activations per image without checkpointing -> "
                 "128 fits, 256 does not; ~50 MB per image with checkpointing -> 1024",
    "datapath": "the in-memory FeatureDataset assembles ~600-1000 samples/s on one thread with no overlap, against "
                "~500 samples/s consumed: the step waits ~50% of the time",
    "features": "VAE encoder 273 GFLOP/image at 256 px, conv + GroupNorm heavy: ~35% MFU, ~1,300 img/s; T5-XXL 1.12 "
                "TFLOP/caption (120 tokens), GEMM-bound: ~55% MFU, ~480 captions/s; 10M images: ~8 GPU-hours",
    "captioner": "decode is weight-bandwidth- and launch-bound: batch 1 ~25-30 tokens/s (0.2 img/s at 128 tokens); "
                 "batch 64 reads 14 GB weights + ~20 GB KV per step: ~15-25 img/s; host wait under 10%",
    "ours-compile-full": "whole-graph compile also fuses across block boundaries: within 5% of the regional compile, "
                         "but several times its compile time",
    "ours-compile-512": "4x the tokens: attention (2T^2h) grows to ~1/4 of the FLOPs but flash keeps it matmul-bound: "
                        "MFU equal or higher than at 256 px",
    # written after run 1, before run 2
    "sdpa": "torch picked cuDNN's attention (~21 ms/step, backward 3x forward, head dim 72 padded to 128): "
            "FlashAttention-2 should be ~1.3x faster on the unmasked self-attention",
    "ours-compile-flash": "flash first for self-attention, cuDNN/efficient for the masked cross-attention: -5 to -10 ms/step",
    "ours-compile-flash-b128": "batch 128 halves the per-image cost of the optimizer + EMA + clipping passes (~12 ms/step): "
                               "+3-5% images/s",
    # written for issue 33, before the run: the last H100 run had the optimizer + EMA + clipping passes at 14.6 ms of
    # 169 ms; each is memory-bound over the ~0.61 G fp32 parameters (2.4 GB a tensor): fused AdamW reads p, g, m, v and
    # writes p, m, v (~17 GB), clipping reads the grads twice (~5 GB), the foreach EMA reads shadow + params twice and
    # writes twice ((s - p), then s -= a(s - p): ~15 GB), so the EMA is about a third, ~5 ms
    "ours-compile-ema4": "the EMA pass on one step in 4: ~3/4 of ~5 ms saved, ~3.5-4 ms/step on the mean (mean_ms; the "
                         "median is a step without the EMA, ~5 ms below ours-compile), ~2% images/s; no change in memory",
    "ours-compile-bf16p": "bf16 weights on fp32 masters (FSDP2 mixed precision, one rank): the fused LayerNorm/GELU/"
                          "modulate kernels (38.8 ms) read and write a bf16 residual stream instead of fp32, and the "
                          "per-forward fp32->bf16 weight casts become one gather-cast per step; FSDP's fp32 grad "
                          "cast adds ~1 ms: -8 to -12 ms, ~158 ms/step, ~36-37% MFU, less activation memory",
    "ours-compile-fp8": "float8 GEMMs (torchao, dynamic per-tensor scales): the 80.6 ms of bf16 matmuls at 91% of their "
                        "ceiling fall to ~55 ms, but at hidden 1152 each linear adds amax + cast passes over its input, "
                        "weight and output grad (~10-15 ms, partly fused by compile): -10 to -15 ms, ~37-38% MFU "
                        "(counted at the bf16 peak)",
    "ours-compile-bf16p-ema4-fp8": "the three together, roughly additive: ~140 ms/step, ~41% MFU; the 45% target "
                                   "(127 ms) needs the attention (21 ms) and the remaining elementwise traffic cut too",
    "ours-compile-flow": "flow matching: the same FLOPs; the model outputs 4 channels instead of 8 and the loss drops the "
                         "IDDPM variance term: within 1-2 ms of ours-compile",
    "ours-compile-repa": "REPA (teacher tokens read as float16 inputs, as features stores them): the 3-layer projector "
                         "on the block-9 tokens adds ~10% FLOPs (counted), a cosine loss and a 16 MB/sample input: "
                         "+8-12% step time, MFU within 1 point",
    "ours-compile-drop50": "token dropping at 50% over blocks 1-26: FLOPs x0.54; the gather/scatter and the fixed "
                           "optimizer + EMA + clipping pass (14.6 ms) do not shrink: ~100-110 ms/step (1.6x images/s), "
                           "MFU (FLOPs as done) ~30%",
    "captioner-diagnose": "decode launches ~1,000 kernels per token with tens of microseconds of Python each: the GPU is "
                          "busy a small fraction of each token at batch 1; a static KV cache (compiled, CUDA graphs) "
                          "should cut the per-token time severalfold",
    # written before run 3 (issue 33), from run 2's features profiles and the compact_text_bench loader figures
    "features-layout": "run 2's NCHW VAE spent 17 of 93 ms per batch in cuDNN's NCHW<->NHWC transposes around the convs, but "
                       "GroupNorm on CUDA makes its input NCHW-contiguous (only the CPU kernel keeps channels_last), and every "
                       "conv of the encoder follows a GroupNorm: the transposes move, they do not go. channels_last 0.95-1.05x "
                       "NCHW (~690 img/s, ~19% MFU). Compiled (compile_vae, added after that prediction): inductor fuses "
                       "GroupNorm + SiLU (run 2: ~40% of the device time in elementwise and norm kernels) into one pass "
                       "each: ~1.3-1.5x NCHW eager (~900-1,000 img/s), which with the compiled T5 brings 10M images to "
                       "~8-9 GPU-hours",
    "features-t5-compile": "eager T5-XXL: 106 ms of matmuls and 112 ms of unfused elementwise work and copies (RMSNorm in "
                           "fp32, gated GELU, softmax, residuals) per batch of 64; compiled blocks fuse those to ~35 ms: "
                           "~1.45x, ~400 captions/s through the job's store path (tokenise, encode, to the host), ~45% MFU; "
                           "compile ~40 s; int8 within 2% of float16 either way",
    "features-compact": "the job already quantises on the encoder's device: int8 on device within 2% of float16 (a few elementwise "
                        "passes, ~1 ms, and half the 63 MB device-to-host copy); the host way (copy bf16, quantise 31M "
                        "values on the CPU) ~0.8x of on-device; codes identical. The job's whole batch: zstd Parquet writes "
                        "of ~34 MB float16 text per batch cost ~25% of its time, int8 halves them: ~1.1x images/s. Best "
                        "combination (channels_last only if it helps, compiled T5, int8): ~11 GPU-hours per 10M images, "
                        "short of 8 (the VAE's eager GroupNorm/SiLU passes are the next lever)",
    "datapath-compact": "int8 rows are half float16's bytes; the workers decode them (a lookup and a multiply a value) into "
                        "the same float16 batch: loader samples/s 1.0-1.1x float16's (~2,500 with 2 workers, ~2,900 with "
                        "4), GPU wait as float16's: ~10% with 2 workers, ~3% with 4",
}

# (part, estimated seconds on an H100) in priority order
PARTS = [("ceilings", 10), ("ours-compile", 60), ("profile", 15), ("ours-compile-bf16p", 40), ("ours-compile-ema4", 20),
         ("ours-compile-fp8", 45), ("ours-compile-bf16p-ema4-fp8", 45), ("ours-compile-flow", 20),
         ("ours-compile-repa", 25), ("ours-compile-drop50", 30), ("features-layout", 60), ("features-t5-compile", 75),
         ("features-compact", 40), ("datapath", 30), ("datapath-compact", 35), ("sdpa", 10),
         ("ours-eager", 20), ("reference", 30), ("ours-compile-ckpt", 50), ("ours-compile-flash", 50),
         ("ours-compile-flash-b128", 50), ("max-batch", 60), ("features", 30), ("captioner", 100), ("captioner-diagnose", 40),
         ("ours-compile-full", 120),
         ("ours-compile-512", 50)]

# named sets of parts for --only: issue 33's run (the step levers, the training levers, the loader
# and the features encoders, in the issue's priority), ~550 s of estimates
RUNS = {"issue33": ["ceilings", "ours-compile", "profile", "ours-compile-bf16p", "ours-compile-ema4", "ours-compile-fp8",
                    "ours-compile-bf16p-ema4-fp8", "ours-compile-flow", "ours-compile-repa", "ours-compile-drop50",
                    "features-layout", "features-t5-compile", "features-compact", "datapath", "datapath-compact"]}


class Run:
    """The state of one benchmark run: settings, results so far, and the JSON it rewrites."""

    def __init__(self, st: gt.Setting, smoke: bool, budget: float, json_path: str | None, wanted: list[str]) -> None:
        self.st, self.smoke, self.budget, self.json_path, self.wanted = st, smoke, budget, json_path, wanted
        self.t0 = time.perf_counter()
        self.peak = device_peak_flops(st.device) if st.device == "cuda" else None
        self.report: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if st.device == "cuda" else "CPU (smoke run)", "smoke": smoke,
            "torch": torch.__version__, "setting": dict(st.__dict__), "datasheet_peak": self.peak,
            "predictions": PREDICTIONS, "results": [], "skipped": [], "errors": {}, "part_seconds": {}}
        self.kept = None  # (step fn, state, inputs) of ours-compile, for profile and datapath

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(self.report, indent=1, default=str))

    def add(self, r: gt.Result) -> None:
        self.report["results"].append(r.__dict__)
        print(result_row(r.__dict__), flush=True)


def result_row(r: dict) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    return (f"| {r['name']} | {r['latent'] * 8} px | {r['batch']} | {f(r['step_ms'], '.1f')} | {f(r['images_per_s'], '.1f')} | "
            f"{f(r['mfu'], '.1%')} | {f(r['mfu_measured'], '.1%')} | {f(r['peak_mem_gib'], '.1f')} | {r['note']} |")


def part_ceilings(run: Run) -> None:
    st = run.st
    c = gt.measure_ceilings(st.device)
    run.report["ceilings"] = c
    run.report["floor"] = gt.floor(st, st.latent, st.batch, c)
    fl = run.report["floor"]
    print(f"device {run.report['device']}; ceilings {c}; floor: {fl['params'] / 1e6:.0f}M params, "
          f"{fl['flops_per_step'] / 1e12:.2f} TFLOP/step, >= {fl['bytes_per_step'] / 1e9:.1f} GB/step", flush=True)


def part_variant(run: Run, name: str) -> None:
    st = run.st
    latent, batch = (st.latent * 2, max(1, st.batch // 4)) if name.endswith("512") else (st.latent, st.batch)
    if m := re.search(r"-b(\d+)$", name):
        batch = int(m.group(1)) if not run.smoke else st.batch * 2
    measured = run.report.get("ceilings", {}).get("matmul_flops")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    keep = name == "ours-compile"
    r, held = gt.run_variant(name, st, latent, batch, run.peak, measured, keep=keep)
    while r.note == "OOM" and batch > 1:  # e.g. the fp32 reference: report it at the batch that fits
        batch //= 2
        r, held = gt.run_variant(name, st, latent, batch, run.peak, measured, keep=keep)
        r.note = r.note or "OOM at larger batches"
    r.extra["graph_breaks"] = dict(counters["graph_break"])
    r.extra["frames_compiled"] = counters["stats"].get("unique_graphs", 0)
    if keep:
        run.kept = held
    run.add(gt.Result(**{**r.__dict__}))


def part_profile(run: Run) -> None:
    fn, _, inputs = run.kept
    run.report["profile"] = gt.profile_table(fn, inputs, run.st)
    for row in run.report["profile"]["top"][:8]:
        print(f"  {row['share']:6.1%} {row['ms_per_step']:8.2f} ms  {row['kernel']}", flush=True)


def part_datapath(run: Run) -> None:
    """The trainer's loader (and the old in-memory dataset, as the baseline) feeding the kept
    ours-compile step, on synthetic T5-XXL-shaped feature shards (benchmarks/data_bench.py)."""
    import tempfile

    from benchmarks.data_bench import write_synthetic_features

    st = run.st
    fn = run.kept[0]
    pure = next((r["step_ms"] for r in run.report["results"] if r["name"] == "ours-compile"), None)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        n = st.batch * 12
        t = time.perf_counter()
        directory = str(write_synthetic_features(Path(tmp) / "features", n, tokens=st.tokens, channels=st.channels,
                                                 latent=(4, st.latent, st.latent)))
        out["rows"], out["write_s"] = n, time.perf_counter() - t
        for name, batches in _loaders(directory, st):
            t = time.perf_counter()
            out[name] = gt.datapath(fn, batches(), st, n_batches=8, pure_step_ms=pure)
            out[name]["wall_s"] = time.perf_counter() - t
            print(f"  datapath {name}: {out[name]}", flush=True)
            run.report["datapath"] = out
            run.save()


def _loaders(directory: str, st: gt.Setting):
    """(name, factory of an endless Batch iterator): the old in-memory dataset, then the
    streaming loader with 2 and 4 worker processes."""
    import itertools

    from benchmarks.data_bench import OldFeatureDataset
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    def old():
        ds = OldFeatureDataset(directory, st.tokens)
        return (ds.get(idx) for e in itertools.count() for idx in ds.global_batches(e, 0, st.batch))
    yield "old FeatureDataset (in memory, main thread)", old
    for workers in (2, 4):
        def new(workers=workers):
            return iter(make_loader(StreamingFeatureDataset(directory, st.tokens), 0, 0, st.batch, workers=workers, epochs=None))
        yield f"streaming loader, {workers} workers", new


def part_max_batch(run: Run) -> None:
    st = run.st
    rows = []
    for ck in (False, True):
        b, mem = gt.max_batch(st, st.latent, ck, start=st.batch)
        rows.append({"ckpt": ck, "max_batch": b, "peak_mem_gib": mem})
        print(f"  max batch {'with' if ck else 'without'} checkpointing: {b} ({mem} GiB)", flush=True)
    run.report["max_batch"] = rows


def part_features(run: Run) -> None:
    from benchmarks.gpu_features import bench_features

    run.report["features"] = bench_features(run.st.device, run.smoke, peak=run.peak)
    print(f"  features: {run.report['features']}", flush=True)


def part_captioner(run: Run) -> None:
    from benchmarks import gpu_captioner

    run.report["captioner"] = gpu_captioner.bench_captioner(run.st.device, smoke=run.smoke)
    print(gpu_captioner.markdown(run.report["captioner"]), flush=True)


def part_sdpa(run: Run) -> None:
    run.report["sdpa"] = gt.bench_sdpa(run.st, run.st.batch, run.st.latent)
    for row in run.report["sdpa"]:
        print(f"  sdpa {row}", flush=True)


def part_captioner_diagnose(run: Run) -> None:
    """On one LLaVA-1.5-7B-shaped captioner: a decode profile (host vs GPU time per token), then,
    if at least a minute is left, generate() with a static KV cache (compiled by transformers)."""
    import tempfile

    from benchmarks import gpu_captioner as gc_

    size = (gc_.SMOKE if run.smoke else gc_.REAL)["image_size"]
    with tempfile.TemporaryDirectory() as tmp:
        cap = gc_.build_captioner(run.st.device, run.smoke, Path(tmp))
        run.report["captioner-decode"] = gc_.bench_decode(cap, run.st.device, size, batch_sizes=(1, 2) if run.smoke else (1, 64))
        print(f"  decode: {run.report['captioner-decode']}", flush=True)
        run.save()
        if run.smoke or run.left() > 60:
            run.report["captioner-static"] = gc_.bench_static(cap, run.st.device, size, bs=2 if run.smoke else 64,
                                                              tokens=8 if run.smoke else 64)
            print(f"  static cache: {run.report['captioner-static']}", flush=True)
        cap.close()


def run_part(run: Run, name: str) -> None:
    from benchmarks import gpu_datapath, gpu_features

    parts = {"ceilings": part_ceilings, "profile": part_profile, "datapath": part_datapath, "max-batch": part_max_batch,
             "features": part_features, "captioner": part_captioner, "sdpa": part_sdpa,
             "captioner-diagnose": part_captioner_diagnose, "datapath-compact": gpu_datapath.part_datapath_compact,
             **gpu_features.PARTS}
    if name in parts:
        parts[name](run)
    else:  # a training-step variant
        part_variant(run, name)
    users = [p for p in ("profile", "datapath", "datapath-compact") if p in run.wanted]
    if run.kept is not None and (not users or name == users[-1]):
        run.kept = None  # the kept compiled step is not needed any more
        gt.free(run.st.device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU (automatic without CUDA); prints only")
    ap.add_argument("--budget", type=float, default=480, help="seconds; parts whose estimate does not fit are skipped")
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(p for p, _ in PARTS)}; or a named run: "
                    f"{', '.join(RUNS)}")
    ap.add_argument("--batch", type=int, default=None, help="batch at 256 px (default 64)")
    ap.add_argument("--json", default=os.environ.get("OUT", "") and str(Path(os.environ["OUT"]) / "gpu_bench.json"),
                    help="write all numbers here (default $OUT/gpu_bench.json when $OUT is set)")
    ap.add_argument("--report", default="", help="write BENCHMARKS.md 'gpu_bench' from these JSONs of GPU runs (comma list), and exit")
    a = ap.parse_args(argv)
    if a.report:
        from benchmarks.gpu_report import write_report

        write_report(*(json.loads(Path(p).read_text()) for p in a.report.split(",")))
        return {}
    smoke = a.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        # compile through dynamo + AOT autograd without codegen: finds graph breaks quickly
        st = gt.Setting(preset="PixArt-tiny/2", latent=8, tokens=16, channels=32, batch=8, warmup=2, steps=3,
                        max_batch_limit=64, compile_backend="aot_eager", device="cpu")
    else:
        st = gt.Setting()
    st.batch = a.batch or st.batch
    names = [p for p, _ in PARTS]
    wanted = [p for v in a.only.split(",") if v for p in RUNS.get(v, [v])] or names
    if bad := [v for v in wanted if v not in names]:
        ap.error(f"unknown part(s) {bad}: pick from {names}")
    run = Run(st, smoke, a.budget, a.json or None, wanted)
    for name, estimate in PARTS:
        if name not in wanted:
            continue
        if name in ("profile", "datapath") and run.kept is None:
            run.report["skipped"].append(f"{name}: ours-compile did not run")
            continue
        if not smoke and estimate > run.left():
            run.report["skipped"].append(f"{name}: {estimate} s estimated, {run.left():.0f} s left")
            print(f"skip {name}: budget", flush=True)
            continue
        t = time.perf_counter()
        print(f"== {name} ({run.left():.0f} s left)", flush=True)
        try:
            run_part(run, name)
        except Exception as e:  # one broken part must not cost the others their GPU time
            import traceback

            run.report["errors"][name] = traceback.format_exc()[-3000:]
            print(f"ERROR in {name}: {e!r}", flush=True)
            run.kept = None if name == "ours-compile" else run.kept
            gt.free(st.device)
        run.report["part_seconds"][name] = time.perf_counter() - t
        run.save()
    print(f"done in {time.perf_counter() - run.t0:.0f} s; skipped: {run.report['skipped']}; "
          f"errors: {list(run.report['errors'])}", flush=True)
    if smoke:
        print("CPU smoke run: harness checked with the tiny preset; BENCHMARKS.md is left alone.")
    return run.report


if __name__ == "__main__":
    main()
