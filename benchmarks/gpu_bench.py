"""GPU benchmark of one PixArt training step (issue 7): images/s, MFU and peak memory.

PixArt-XL/2 (~611M parameters), random weights, synthetic precomputed features already on the
device (latent posterior sample, T5 features of 120 tokens x 4096), in ONE run on one device:

  reference   a plain loop over the same diffusers PixArtTransformer2DModel: fp32, eager,
              unfused AdamW, MSE on epsilon only (what a first training script does)
  ours-*      t2i.train.TrainStep, the trainer's own step (IDDPM hybrid loss, null-caption
              dropout, grad clipping, fused AdamW, foreach EMA) with bf16 autocast, SDPA
              attention (flash on bf16), torch.compile, and with/without gradient checkpointing
  512 px      the same at 64x64 latents
  max batch   a doubling search for the largest batch that fits (eager bf16, OOM caught)
  captioner   benchmarks/gpu_captioner.py: a random LLaVA-1.5-7B-shaped model through the
              transformers backend, images/s at batch 1..64, and the share of time the GPU
              waits on the host in the real caption job

Before timing, it counts the floor: model FLOPs per step (t2i.models.flops_per_image, matmuls
only) over the measured bf16 matmul rate, and the fewest bytes per step (AdamW + EMA + the bf16
weight casts) over the measured copy bandwidth. MFU is reported against the datasheet peak
(t2i.models.PEAK_FLOPS) and against the measured matmul ceiling.

    python benchmarks/gpu_bench.py                 # on a GPU: all of it, writes BENCHMARKS.md "gpu_bench"
    python benchmarks/gpu_bench.py --only ours-compile,ours-compile-ckpt   # a subset (device time is scarce)
    python benchmarks/gpu_bench.py --cpu-smoke     # tiny preset on CPU: checks the harness, prints only

A CPU run never writes BENCHMARKS.md (it would overwrite GPU figures with meaningless ones).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2i.models import PEAK_FLOPS, build_transformer, device_peak_flops, flops_per_image, get_preset  # noqa: E402


@dataclass
class Setting:
    preset: str = "PixArt-XL/2"
    latent: int = 32  # 256 px / 8
    tokens: int = 120
    channels: int = 4096
    batch: int = 64
    warmup: int = 5  # steps before timing (compile happens in the first)
    steps: int = 20  # timed steps
    max_batch_limit: int = 4096
    compile_backend: str = "inductor"
    device: str = "cuda"


@dataclass
class Result:
    name: str
    latent: int
    batch: int
    step_ms: float | None = None
    images_per_s: float | None = None
    mfu: float | None = None  # vs the datasheet peak
    mfu_measured: float | None = None  # vs the measured matmul ceiling
    peak_mem_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# Predictions written before the first GPU run (METHOD.md: predict, change, measure, look back).
# The outcome column of the table is measured; the lead fills in the "why" after the run.
PREDICTIONS = {
    "reference": "fp32 (TF32 off) on H100: ~50-60 TFLOP/s at best -> MFU under 6% of the bf16 peak",
    "ours-eager": "bf16 autocast + flash SDPA + fused AdamW: matmuls on tensor cores; many small elementwise "
                  "kernels (adaLN modulate, GELU, norms) and fp32->bf16 weight casts each step: ~30-40% MFU",
    "ours-compile": "torch.compile fuses the elementwise chains: 1.2-1.4x over ours-eager, ~40-50% MFU",
    "ours-compile-ckpt": "gradient checkpointing recomputes the forward (4/3 of the FLOPs of a step, not counted "
                         "in MFU): ~0.75x the images/s of ours-compile, far less activation memory",
    "ours-compile-512": "4x the tokens: attention (2T^2h) grows to ~1/4 of the FLOPs but flash keeps it "
                        "matmul-bound: MFU equal or higher than at 256 px",
    "ours-compile-ckpt-512": "as ckpt at 256: ~0.75x of ours-compile-512",
}

VARIANTS = ["reference", "ours-eager", "ours-compile", "ours-compile-ckpt", "ours-compile-512", "ours-compile-ckpt-512",
            "max-batch", "captioner"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_ceilings(device: str) -> dict[str, float]:
    """The device's own ceilings: a bf16 matmul rate (FLOP/s) and copy bandwidth (bytes/s, read + write)."""
    if device != "cuda":
        return {}
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    x = torch.randn(256 * 2**20, device=device)  # 1 GiB fp32
    y = torch.empty_like(x)
    out = {}
    for name, fn, work in (("matmul_flops", lambda: a @ b, 2 * n**3), ("copy_bytes_per_s", lambda: y.copy_(x), 2 * x.numel() * 4)):
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        out[name] = work / statistics.median(times)
    del a, b, x, y
    torch.cuda.empty_cache()
    return out


def floor(st: Setting, latent: int, batch: int, ceilings: dict[str, float]) -> dict[str, float]:
    """FLOPs and the fewest bytes of one step; their times at the measured ceilings."""
    n_params = _xl_params(st, latent)
    flops = flops_per_image(st.preset, (latent, latent), st.tokens, st.channels) * batch
    # AdamW: read p, g, m, v, write p, m, v (fp32); EMA: read ema, p, write ema; bf16 casts of the
    # weights for forward and backward: read fp32 + write bf16, twice. Activations and the inputs come on top.
    bytes_ = n_params * (7 * 4 + 3 * 4 + 2 * (4 + 2)) + batch * (latent * latent * 4 * 4 * 2 + st.tokens * st.channels * 4)
    out = {"params": n_params, "flops_per_step": flops, "bytes_per_step": bytes_}
    if ceilings:
        out["t_flops_ms"] = flops / ceilings["matmul_flops"] * 1e3
        out["t_bytes_ms"] = bytes_ / ceilings["copy_bytes_per_s"] * 1e3
    return out


_PARAMS: dict = {}


def _xl_params(st: Setting, latent: int) -> int:
    key = (st.preset, latent, st.channels)
    if key not in _PARAMS:
        with torch.device("meta"):
            from diffusers import PixArtTransformer2DModel

            p = get_preset(st.preset)
            m = PixArtTransformer2DModel(num_attention_heads=p.heads, attention_head_dim=p.hidden // p.heads, in_channels=4,
                                         out_channels=8, num_layers=p.depth, cross_attention_dim=p.hidden, sample_size=latent,
                                         patch_size=p.patch, caption_channels=st.channels, norm_type="ada_norm_single",
                                         num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6,
                                         activation_fn="gelu-approximate", attention_bias=True,
                                         use_additional_conditions=False)
        _PARAMS[key] = sum(x.numel() for x in m.parameters()) + st.tokens * st.channels  # + null caption
    return _PARAMS[key]


def synthetic_inputs(st: Setting, latent: int, batch: int, sets: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random (never zero) precomputed features on the device; several sets, rotated per step."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(sets):
        out.append({
            "x0": torch.randn(batch, 4, latent, latent, generator=g).to(st.device),
            "noise": torch.randn(batch, 4, latent, latent, generator=g).to(st.device),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(st.device),
            "drop": (torch.rand(batch, generator=g) < 0.1).to(st.device),
            "text": torch.randn(batch, st.tokens, st.channels, generator=g).to(st.device),
            "mask": torch.ones(batch, st.tokens, dtype=torch.long).to(st.device),
        })
    return out


def _time_steps(step_fn, inputs, st: Setting) -> tuple[list[float], float]:
    """Per-step seconds (events on CUDA, synchronized host clock on CPU) and peak memory (GiB)."""
    for i in range(st.warmup):
        step_fn(inputs[i % len(inputs)])
    sync(st.device)
    if st.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(st.steps):
        inp = inputs[i % len(inputs)]
        if st.device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step_fn(inp)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            step_fn(inp)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if st.device == "cuda" else None
    return times, peak


def reference_step(st: Setting, latent: int, batch: int):
    """The plain loop: fp32 eager forward, MSE on epsilon, backward, unfused AdamW."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = build_transformer(st.preset, latent, st.channels).to(st.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03, foreach=False, fused=False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def step(inp):
        out = model(sched.add_noise(inp["x0"], inp["noise"], inp["t"]), encoder_hidden_states=inp["text"],
                    encoder_attention_mask=inp["mask"], timestep=inp["t"],
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out[:, :4], inp["noise"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def ours_step(st: Setting, latent: int, batch: int, compile: bool, ckpt: bool, mixed_precision: str):
    """t2i.train.TrainStep exactly as train() builds it (same model, optimizer, EMA, compile, prepare)."""
    from t2i.diffusion import Diffusion
    from t2i.train import TrainConfig, TrainStep, build_model, make_accelerator, setup_optimization

    cfg = TrainConfig(preset=st.preset, resolution=latent * 8, max_tokens=st.tokens, mixed_precision=mixed_precision,
                      grad_checkpointing=ckpt, compile=compile, lr=2e-5, warmup_steps=10, grad_clip=0.01)
    accel = make_accelerator(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, latent, st.channels)
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    stepper = TrainStep.prepare(cfg, accel, model, opt, sched, ema, Diffusion(learned_sigma=cfg.learned_sigma),
                                compile_backend=st.compile_backend)
    model.train()
    last = {}

    def step(inp):
        last["loss"] = stepper.micro(inp)
        last["grad_norm"] = stepper.update()

    return step, (model, stepper, last)


def run_variant(name: str, st: Setting, latent: int, batch: int, peak: float | None, measured: float | None) -> Result:
    compile = "compile" in name
    ckpt = "ckpt" in name
    res = Result(name, latent, batch)
    try:
        if name == "reference":
            fn, keep = reference_step(st, latent, batch)
        else:
            mp = "bf16" if st.device == "cuda" else "no"
            fn, keep = ours_step(st, latent, batch, compile=compile, ckpt=ckpt, mixed_precision=mp)
        inputs = synthetic_inputs(st, latent, batch)
        times, mem = _time_steps(fn, inputs, st)
        if name != "reference":
            loss = keep[2]["loss"]
            if not torch.isfinite(loss).all():  # a fast step that computes garbage is no result
                raise RuntimeError(f"non-finite loss {loss.tolist()}")
            res.extra["loss"] = loss.tolist()
        med = statistics.median(times)
        res.step_ms = med * 1e3
        res.images_per_s = batch / med
        flops = flops_per_image(st.preset, (latent, latent), st.tokens, st.channels) * batch
        res.mfu = flops / med / peak if peak else None
        res.mfu_measured = flops / med / measured if measured else None
        res.peak_mem_gib = mem
        res.extra["spread_ms"] = (min(times) * 1e3, max(times) * 1e3)
    except torch.cuda.OutOfMemoryError:
        res.note = "OOM"
    finally:
        keep = fn = None  # noqa: F841
        _free(st.device)
    return res


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def max_batch(st: Setting, latent: int, ckpt: bool, start: int) -> tuple[int, float | None]:
    """Largest batch (doubling from `start`) for which the eager bf16 TrainStep runs 2 steps, and its
    peak GiB. One model per search: only the inputs change between tries."""
    best, best_mem, b = 0, None, start
    fn, keep = ours_step(st, latent, start, compile=False, ckpt=ckpt, mixed_precision="bf16" if st.device == "cuda" else "no")
    try:
        while b <= st.max_batch_limit:
            inputs = None
            try:
                inputs = synthetic_inputs(st, latent, b, sets=1)
                if st.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(2):
                    fn(inputs[0])
                sync(st.device)
                best, best_mem = b, (torch.cuda.max_memory_allocated() / 2**30 if st.device == "cuda" else None)
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                inputs = None
                keep[1].opt.zero_grad(set_to_none=True)  # an OOM mid-backward leaves gradients behind
                _free(st.device)
            b *= 2
    finally:
        fn = keep = None  # noqa: F841
        _free(st.device)
    return best, best_mem


def table(results: list[Result]) -> str:
    rows = ["| variant | latent | batch | ms/step | images/s | MFU (datasheet) | MFU (measured matmul) | peak GiB | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in results:
        rows.append(f"| {r.name} | {r.latent}x{r.latent} | {r.batch} | {f(r.step_ms, '.1f')} | {f(r.images_per_s, '.1f')} | "
                    f"{f(r.mfu, '.1%')} | {f(r.mfu_measured, '.1%')} | {f(r.peak_mem_gib, '.1f')} | {r.note} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU (automatic without CUDA); prints only")
    ap.add_argument("--batch", type=int, default=None, help="batch at 256 px (default 64; 512 px uses a quarter)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=os.environ.get("OUT", "") and str(Path(os.environ["OUT"]) / "gpu_bench.json"),
                    help="write all numbers as JSON here (default $OUT/gpu_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke or not torch.cuda.is_available()
    if smoke:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        # tiny preset; compile through dynamo + AOT autograd without C++ codegen: finds graph breaks quickly
        st = Setting(preset="PixArt-tiny/2", latent=8, tokens=16, channels=32, batch=8, warmup=2, steps=3,
                     max_batch_limit=64, compile_backend="aot_eager", device="cpu")
    else:
        st = Setting()
    st.batch = a.batch or st.batch
    st.steps = a.steps or st.steps
    st.warmup = a.warmup or st.warmup
    only = [v for v in a.only.split(",") if v] or VARIANTS
    bad = [v for v in only if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}: pick from {VARIANTS}")

    device_name = torch.cuda.get_device_name() if st.device == "cuda" else "CPU (smoke run)"
    peak = device_peak_flops(st.device) if st.device == "cuda" else None
    ceilings = measure_ceilings(st.device)
    measured = ceilings.get("matmul_flops")
    print(f"device: {device_name}; datasheet bf16 peak {peak and peak / 1e12} TFLOP/s; measured "
          + (f"matmul {measured / 1e12:.0f} TFLOP/s, copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s" if ceilings else "nothing (CPU)"),
          flush=True)
    big = st.latent * 2
    floors = {lat: floor(st, lat, b, ceilings) for lat, b in ((st.latent, st.batch), (big, max(1, st.batch // 4)))}
    for lat, fl in floors.items():
        print(f"floor {lat}x{lat}: {fl['params'] / 1e6:.1f}M params, {fl['flops_per_step'] / 1e12:.3f} TFLOP/step, "
              f">= {fl['bytes_per_step'] / 1e9:.2f} GB/step" + (f" -> {fl['t_flops_ms']:.1f} ms compute, {fl['t_bytes_ms']:.1f} ms memory"
                                                                  if "t_flops_ms" in fl else ""), flush=True)

    results: list[Result] = []
    breaks: dict[str, int] = {}
    from torch._dynamo.utils import counters
    for name in only:
        if name in ("max-batch", "captioner"):
            continue
        torch._dynamo.reset()  # each variant compiles its own model from a clean cache (no recompile limit hit)
        latent, batch = (big, max(1, st.batch // 4)) if name.endswith("512") else (st.latent, st.batch)
        t0 = time.perf_counter()
        r = run_variant(name, st, latent, batch, peak, measured)
        while r.note == "OOM" and batch > 1:  # e.g. the fp32 reference: report it at the batch that fits
            batch //= 2
            r = run_variant(name, st, latent, batch, peak, measured)
            r.note = r.note or "OOM at larger batches"
        r.extra["wall_s"] = time.perf_counter() - t0
        for reason, n in counters["graph_break"].items():  # per variant: read, then clear
            breaks[f"{name}: {reason}"] = n
        counters["graph_break"].clear()
        results.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    if "max-batch" in only:
        for lat in (st.latent, big):
            for ck in (False, True):
                b, mem = max_batch(st, lat, ck, start=max(1, st.batch // (4 if lat == big else 1)))
                r = Result(f"max-batch{'-ckpt' if ck else ''}{'-512' if lat == big else ''}", lat, b, peak_mem_gib=mem,
                           note=f"eager bf16; doubling search, limit {st.max_batch_limit}")
                results.append(r)
                print(table([r]).splitlines()[-1], flush=True)

    captioner = None
    if "captioner" in only:  # the caption side on the same device: benchmarks/gpu_captioner.py
        from benchmarks import gpu_captioner

        captioner = gpu_captioner.bench_captioner(st.device, smoke=smoke)
        print(gpu_captioner.markdown(captioner), flush=True)

    print("\n" + table(results))
    print(f"graph breaks under torch.compile: {breaks or 'none'}")
    ref = next((r for r in results if r.name == "reference" and r.images_per_s), None)
    lines = []
    for r in results:
        if r.name in PREDICTIONS and r.images_per_s:
            ratio = f"{r.images_per_s / ref.images_per_s:.2f}x the reference" if ref else ""
            mfu = f"MFU {r.mfu:.1%}" if r.mfu is not None else "MFU n/a on CPU"
            lines.append(f"- **{r.name}**: predicted {PREDICTIONS[r.name]}. Measured: {r.images_per_s:.1f} images/s, {mfu}; {ratio}")
    print("\n".join(lines))
    report = {"device": device_name, "smoke": smoke, "setting": st.__dict__, "ceilings": ceilings,
              "floors": {str(k): v for k, v in floors.items()}, "graph_breaks": breaks,
              "results": [r.__dict__ for r in results], "captioner": captioner}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
    if smoke:
        print("\nCPU smoke run: harness checked with the tiny preset; figures are not benchmarks and BENCHMARKS.md is left alone.")
        return report
    from benchmarks._report import write_section

    fl = floors[st.latent]
    xl = next((r for r in results if r.name == "ours-compile" and r.mfu), None)
    body = (f"Device: **{device_name}**. PixArt-XL/2 ({fl['params'] / 1e6:.0f}M parameters), random weights, synthetic "
            f"precomputed features on the device, {st.tokens} T5 tokens x {st.channels}. One run, same device; median of "
            f"{st.steps} steps after {st.warmup} warm-up steps, timed with CUDA events.\n\n"
            + (f"**PixArt-XL/2 at 256 px, our trainer (bf16, flash SDPA, fused AdamW, torch.compile): MFU {xl.mfu:.1%}** "
               f"({xl.images_per_s:.0f} images/s at batch {xl.batch}).\n\n" if xl else "")
            + f"Ceilings measured on this device: bf16 matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s (datasheet "
              f"{peak / 1e12 if peak else float('nan'):.0f}), copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s. Floor at 256 px, batch "
              f"{st.batch}: {fl['flops_per_step'] / 1e12:.2f} TFLOP -> {fl['t_flops_ms']:.1f} ms; >= {fl['bytes_per_step'] / 1e9:.1f} GB "
              f"-> {fl['t_bytes_ms']:.1f} ms: compute-bound.\n\n"
            + table(results) + f"\n\nGraph breaks under torch.compile: {breaks or 'none'}.\n\n"
            + "Predictions (written before the run) and outcomes:\n\n" + "\n".join(lines) + "\n"
            + ("\n" + gpu_captioner.markdown(captioner) + "\n" if captioner else ""))
    write_section("gpu_bench", body)
    return report


if __name__ == "__main__":
    main()
