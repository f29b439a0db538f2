"""The training side of the GPU benchmark (benchmarks/gpu_bench.py runs it): one PixArt training
step timed on one device, its FLOP/byte floor, the largest batch that fits, a profiler table of
the kernels that dominate, and the data path against what the step consumes.

Everything here also runs on CPU with a tiny preset (`gpu_bench.py --cpu-smoke`), so the harness is
checked before any GPU time is spent.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from t2i.models import build_transformer, flops_per_image


@dataclass
class Setting:
    preset: str = "PixArt-XL/2"
    latent: int = 32  # 256 px / 8
    tokens: int = 120
    channels: int = 4096
    batch: int = 64
    warmup: int = 5  # steps before timing (compilation happens in the first)
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
    mfu_measured: float | None = None  # vs the matmul ceiling measured on this device
    peak_mem_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _event_median(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median seconds of `fn` on the current CUDA stream, timed with events after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def measure_ceilings(device: str) -> dict[str, float]:
    """The device's own ceilings: bf16 matmul FLOP/s (8192^3, random data) and copy bytes/s (read + write)."""
    if device != "cuda":
        return {}
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    x = torch.randn(256 * 2**20, device=device)  # 1 GiB fp32
    y = torch.empty_like(x)
    out = {"matmul_flops": 2 * n**3 / _event_median(lambda: a @ b),
           "copy_bytes_per_s": 2 * x.numel() * 4 / _event_median(lambda: y.copy_(x))}
    del a, b, x, y
    free(device)
    return out


def count_params(st: Setting, latent: int) -> int:
    """Trainable parameters (transformer + null caption), counted on the meta device."""
    with torch.device("meta"):
        m = build_transformer(st.preset, latent, st.channels)
    return sum(p.numel() for p in m.parameters()) + st.tokens * st.channels


def floor(st: Setting, latent: int, batch: int, ceilings: dict[str, float]) -> dict[str, float]:
    """FLOPs and the fewest bytes of one step, and their times at the measured ceilings."""
    n_params = count_params(st, latent)
    flops = flops_per_image(st.preset, (latent, latent), st.tokens, st.channels) * batch
    # AdamW reads p, g, m, v and writes p, m, v (fp32); EMA reads ema, p and writes ema; the bf16
    # weight casts read fp32 and write bf16 for forward and again for backward. Inputs on top;
    # activations (which a fused kernel could keep on chip) are not counted: this is a floor.
    bytes_ = n_params * (7 * 4 + 3 * 4 + 2 * (4 + 2)) + batch * (latent * latent * 4 * 4 * 2 + st.tokens * st.channels * 4)
    out = {"params": n_params, "flops_per_step": flops, "bytes_per_step": bytes_}
    if ceilings:
        out["t_flops_ms"] = flops / ceilings["matmul_flops"] * 1e3
        out["t_bytes_ms"] = bytes_ / ceilings["copy_bytes_per_s"] * 1e3
    return out


def synthetic_inputs(st: Setting, latent: int, batch: int, sets: int = 2) -> list[dict[str, torch.Tensor]]:
    """Random (never zero) precomputed features, drawn on the device (seconds, not minutes, for
    the large batches of the max-batch search); several sets, rotated per step. Laid out as
    TrainStep.micro takes them: the captions under "cond", named as the model's arguments."""
    g = torch.Generator(st.device).manual_seed(0)
    kw = {"generator": g, "device": st.device}
    return [{"x0": torch.randn(batch, 4, latent, latent, **kw), "noise": torch.randn(batch, 4, latent, latent, **kw),
             "t": torch.randint(0, 1000, (batch,), **kw), "drop": torch.rand(batch, **kw) < 0.1,
             "cond": {"captions": torch.randn(batch, st.tokens, st.channels, **kw),
                      "caption_mask": torch.ones(batch, st.tokens, dtype=torch.long, device=st.device)}} for _ in range(sets)]


def time_steps(step_fn, inputs, st: Setting, warmup: int | None = None, steps: int | None = None) -> tuple[list[float], float | None]:
    """Per-step seconds (CUDA events; a synchronised host clock on CPU) and peak memory (GiB)."""
    for i in range(st.warmup if warmup is None else warmup):
        step_fn(inputs[i % len(inputs)])
    sync(st.device)
    if st.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(st.steps if steps is None else steps):
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


def reference_step(st: Setting, latent: int):
    """The plain loop a first training script has: fp32 eager, MSE on epsilon, unfused AdamW."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = build_transformer(st.preset, latent, st.channels).to(st.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.03, foreach=False, fused=False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")

    def step(inp):
        out = model(sched.add_noise(inp["x0"], inp["noise"], inp["t"]), encoder_hidden_states=inp["cond"]["captions"],
                    encoder_attention_mask=inp["cond"]["caption_mask"], timestep=inp["t"],
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out[:, :4], inp["noise"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, {"model": model, "opt": opt}


TEACHER_DIM = 768  # REPA's teacher tokens: DINOv2-B/14 (768 wide) on the model's token grid, as features stores them

# the TrainConfig settings a variant-name suffix turns on (issue 33's step levers and the new training levers)
SUFFIXES = {"-bf16p": {"param_dtype": "bfloat16"}, "-fp8": {"float8": True},
            "-flow": {"objective": "flow", "timestep_density": "logit_normal"},
            "-repa": {"repa_weight": 0.5}, "-drop50": {"token_drop": 0.5}}


def ours_step(st: Setting, latent: int, compile: str | None, ckpt: bool, attention: str = "auto", **settings: Any):
    """t2i.train.TrainStep exactly as train() builds it (model, fused AdamW, EMA, autocast, and the
    stage's levers: routing for token dropping, REPA's projector and loss term).
    compile: None (eager), "blocks" (the trainer's regional compile) or "full" (whole model);
    settings: other TrainConfig settings (ema_every, param_dtype, float8, objective, repa_weight, token_drop)."""
    from t2i.objective import build_objective
    from t2i.repa import repa_terms
    from t2i.routing import attach_routing
    from t2i.text_cond import TextConditioning
    from t2i.train import TrainConfig, TrainStep, make_accelerator, setup_optimization

    # bf16 autocast on CPU too: one process keeps one accelerate state, and param_dtype needs it
    cfg = TrainConfig(preset=st.preset, resolution=latent * 8, max_tokens=st.tokens, mixed_precision="bf16",
                      grad_checkpointing=ckpt, compile=compile == "blocks", lr=2e-5, warmup_steps=10, grad_clip=0.01,
                      attention=attention, **settings)
    accel = make_accelerator(cfg)
    torch.manual_seed(0)
    objective = build_objective(vars(cfg))
    model = TextConditioning().build_model(cfg, latent, st.channels, objective.learned_sigma)
    depth = len(model.transformer.transformer_blocks)
    route = (cfg.token_drop_start, cfg.token_drop_end) if depth > 2 else (0, depth)  # the smoke run's 2 blocks: both
    token_drop = attach_routing(model, cfg.token_drop, *route)
    terms = repa_terms(vars(cfg), model, TEACHER_DIM)
    opt, sched, ema = setup_optimization(cfg, model, accel.device)
    stepper = TrainStep.prepare(cfg, accel, model, opt, sched, ema, objective, compile_backend=st.compile_backend,
                                terms=terms, token_drop=token_drop)
    if compile == "full":
        stepper.run_model = torch.compile(stepper.run_model, backend=st.compile_backend)
    model.train()
    blocks = model.transformer.transformer_blocks
    flops_kw = {"token_drop": cfg.token_drop, "routed_blocks": getattr(blocks, "end", 0) - getattr(blocks, "start", 0),
                "token_macs": sum(t.macs for t in terms)}  # FLOPs as the model does them (t2i.models.flops_per_image)
    state: dict[str, Any] = {"model": model, "stepper": stepper, "flops_kw": flops_kw,
                             "lever_inputs": {"token_drop": token_drop, "repa": bool(terms),
                                              "objective": objective}}

    def step(inp):
        state["loss"] = stepper.micro(inp)
        state["grad_norm"] = stepper.update()

    return step, state


def build_step(name: str, st: Setting, latent: int):
    """The step a variant name describes: reference | ours-[eager|compile|compile-full][-ckpt][-flash|-cudnn|-efficient]
    [-ema<k>] (-ema4: the EMA averaged on every 4th step only) and any of SUFFIXES (-bf16p: bf16 weights on
    fp32 masters; -fp8: float8 matmuls; -flow: flow matching; -repa: REPA on stored teacher tokens;
    -drop50: token dropping at 50%)."""
    if name.startswith("reference"):
        return reference_step(st, latent)
    compile = "full" if "compile-full" in name else ("blocks" if "compile" in name else None)
    attention = next((a for a in ("flash", "cudnn", "efficient") if f"-{a}" in name), "auto")
    ema = re.search(r"-ema(\d+)", name)
    settings = {k: v for suffix, kv in SUFFIXES.items() if suffix in name for k, v in kv.items()}
    return ours_step(st, latent, compile=compile, ckpt="ckpt" in name, attention=attention,
                     ema_every=int(ema.group(1)) if ema else 1, **settings)


def lever_inputs(inputs: list[dict[str, Any]], st: Setting, latent: int, levers: dict[str, Any]) -> list[dict[str, Any]]:
    """`inputs` with the timesteps the stage's objective draws, and what the levers read: the
    tokens each sample keeps (token dropping, drawn as make_inputs draws them) and the teacher's
    patch tokens as features stores them (float16)."""
    from t2i.noise import random_words

    out = []
    for i, inp in enumerate(inputs):
        batch, grid = inp["x0"].shape[0], latent // levers["token_drop"].patch
        keys = torch.arange(batch, dtype=torch.int64).numpy() + 1000 * i
        extra: dict[str, Any] = {"t": levers["objective"].draw_timesteps(random_words(keys, 1)[:, 0]).to(st.device)}
        if levers["token_drop"].ratio:  # the stage's TokenDrop, as make_inputs draws it
            extra["keep"] = levers["token_drop"].keep(keys, (latent, latent), first=1).to(st.device)
        if levers["repa"]:
            g = torch.Generator(st.device).manual_seed(i)
            target = torch.randn(batch, grid * grid, TEACHER_DIM, generator=g, device=st.device).half()
            extra["repa"] = {"target": target, "grid": (grid, grid)}
        out.append({**inp, **extra})
    return out


def run_variant(name: str, st: Setting, latent: int, batch: int, peak: float | None, measured: float | None,
                keep: bool = False) -> tuple[Result, Any]:
    """Time one variant. With keep=True the (step, state) pair is returned for later parts
    (profiling, the data path); otherwise everything is freed before returning."""
    res, held = Result(name, latent, batch), None
    fn = state = None
    try:
        t0 = time.perf_counter()
        fn, state = build_step(name, st, latent)
        inputs = synthetic_inputs(st, latent, batch)
        if "lever_inputs" in state:
            inputs = lever_inputs(inputs, st, latent, state["lever_inputs"])
        warm = 2 if name.startswith("reference") else None
        steps = max(3, st.steps // 4) if name.startswith("reference") else None
        times, mem = time_steps(fn, inputs, st, warmup=warm, steps=steps)
        if "loss" in state:
            loss = state["loss"]
            if not torch.isfinite(loss).all():  # a fast step that computes garbage is no result
                raise RuntimeError(f"non-finite loss {loss.tolist()}")
            res.extra["loss"] = loss.tolist()
        med = statistics.median(times)
        flops = flops_per_image(st.preset, (latent, latent), st.tokens, st.channels, **state.get("flops_kw", {})) * batch
        res.step_ms, res.images_per_s, res.peak_mem_gib = med * 1e3, batch / med, mem
        res.mfu = flops / med / peak if peak else None
        res.mfu_measured = flops / med / measured if measured else None
        # mean_ms: what a run pays per step when steps differ (-ema<k>: one step in k averages the EMA)
        res.extra["flops_per_step"] = flops
        res.extra.update(spread_ms=(min(times) * 1e3, max(times) * 1e3), mean_ms=statistics.fmean(times) * 1e3,
                         wall_s=time.perf_counter() - t0)
        if keep:
            held = (fn, state, inputs)
    except torch.cuda.OutOfMemoryError:
        res.note = "OOM"
    finally:
        if held is None:
            fn = state = None  # noqa: F841
            free(st.device)
    return res, held


def max_batch(st: Setting, latent: int, ckpt: bool, start: int) -> tuple[int, float | None]:
    """Largest batch (doubling from `start`) for which the eager bf16 TrainStep runs 2 steps, and
    its peak GiB. One model per search: only the inputs change between tries."""
    best, best_mem, b = 0, None, start
    fn, state = ours_step(st, latent, compile=None, ckpt=ckpt)
    try:
        while b <= st.max_batch_limit:
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
                state["stepper"].opt.zero_grad(set_to_none=True)  # an OOM mid-backward leaves gradients behind
                free(st.device)
            b *= 2
    finally:
        fn = state = None  # noqa: F841
        free(st.device)
    return best, best_mem


# kernel-name fragments per category, checked in order (cuDNN's attention kernels mention wgmma too)
CATEGORIES = [("attention", ("sdpa", "flash", "fmha", "attention")),
              ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "wgmma", "aten::mm", "aten::addmm", "aten::bmm")),
              ("optimizer + EMA", ("multi_tensor_apply", "adam", "foreach")),
              ("fused elementwise (triton)", ("triton_",)),
              ("copies and casts", ("copy", "cast", "convert", "fill"))]


def category(kernel: str) -> str:
    k = kernel.lower()
    return next((name for name, words in CATEGORIES if any(w in k for w in words)), "other elementwise / reductions")


def profile_table(fn, inputs, st: Setting, steps: int = 3, rows: int = 15) -> dict[str, Any]:
    """torch.profiler over `steps` training steps (see `profile_calls`)."""
    it = iter(range(steps))
    return profile_calls(lambda: fn(inputs[next(it) % len(inputs)]), st.device, steps, rows)


def profile_calls(call: Callable[[], Any], device: str, calls: int = 3, rows: int = 15) -> dict[str, Any]:
    """torch.profiler over `calls` calls of `call`: device time per call by kernel category and the
    kernels that dominate. On CUDA only kernel events count (the aten ops that launch them would
    count them twice); on CPU the aten ops' own time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        sync(device)
    wall_ms = (time.perf_counter() - t0) / calls * 1e3
    if cuda:
        # record_function ranges (e.g. "Optimizer.step#AdamW.step") also appear on the device timeline,
        # spanning kernels counted on their own: kernels only
        events = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                  if e.device_type == DeviceType.CUDA and "#" not in e.key]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]
    events = sorted((e for e in events if e[1] > 0), key=lambda e: e[1], reverse=True)
    total = sum(e[1] for e in events) or 1.0
    cats: dict[str, float] = {}
    for key, us, _ in events:
        cats[category(key)] = cats.get(category(key), 0.0) + us / 1e3 / calls
    top = [{"kernel": k[:100], "category": category(k), "ms_per_step": us / 1e3 / calls, "share": us / total,
            "calls_per_step": n / calls} for k, us, n in events[:rows]]
    return {"device_ms_per_step": total / 1e3 / calls, "wall_ms_per_step_profiled": wall_ms,
            "categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])), "top": top, "kernels": len(events)}


def bench_sdpa(st: Setting, batch: int, latent: int, heads: int = 16, head_dim: int = 72) -> list[dict[str, Any]]:
    """Forward + backward of PixArt's two attentions (self over the patches, cross to the masked
    caption) with each SDPA kernel forced: ms per call, or why it refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = st.device, torch.bfloat16 if st.device == "cuda" else torch.float32
    t = (latent // 2) ** 2
    q = torch.randn(batch, heads, t, head_dim, device=dev, dtype=dt, requires_grad=True)
    kv_self = [torch.randn(batch, heads, t, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(2)]
    kv_cross = [torch.randn(batch, heads, st.tokens, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(2)]
    keep = torch.rand(batch, 1, 1, st.tokens, device=dev) > 0.3
    bias = torch.zeros(batch, 1, 1, st.tokens, device=dev, dtype=dt).masked_fill(~keep, -10000.0)  # as diffusers builds it
    rows = []
    for kind, (k, v), mask in (("self", kv_self, None), ("cross (masked)", kv_cross, bias)):
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            def call():
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                out.sum().backward()
            try:
                ms = (_event_median(call, reps=10) if dev == "cuda" else _host_median(call)) * 1e3
                rows.append({"attention": kind, "backend": backend, "ms_fwd_bwd": ms})
            except RuntimeError as e:
                rows.append({"attention": kind, "backend": backend, "refused": str(e).splitlines()[0][:120]})
    return rows


def _host_median(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def datapath(step_fn, batches, st: Setting, n_batches: int, pure_step_ms: float | None) -> dict[str, Any]:
    """Samples/s a loader delivers to the device (batch assembly, make_inputs, copy), and the
    same loader feeding the training step: ms per step against the step alone (`pure_step_ms`).
    `batches` is an iterator of t2i.data.Batch."""
    from t2i.diffusion import Diffusion
    from t2i.text_cond import TextConditioning
    from t2i.train import make_inputs

    objective, conditioning = Diffusion(), TextConditioning()

    def device_inputs(b):
        inp = make_inputs(b, 0.18215, objective, 0.1, list(range(len(b.keys))))
        cond = {k: v.to(st.device, non_blocking=True) for k, v in conditioning.inputs(b).items()}
        moved = {k: v if v is None else v.to(st.device, non_blocking=True) for k, v in inp.items()}  # keep: None without token dropping
        return {**moved, "cond": cond}

    device_inputs(next(batches))  # worker processes start on the first batch: not part of the rate
    sync(st.device)
    t0 = time.perf_counter()
    got = 0
    for _ in range(n_batches):
        inp = device_inputs(next(batches))
        got += inp["x0"].shape[0]
    sync(st.device)
    alone = got / (time.perf_counter() - t0)
    step_fn(device_inputs(next(batches)))  # shapes seen once before timing the loop
    sync(st.device)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step_fn(device_inputs(next(batches)))
    sync(st.device)
    loop_ms = (time.perf_counter() - t0) / n_batches * 1e3
    out = {"loader_samples_per_s": alone, "loop_step_ms": loop_ms, "pure_step_ms": pure_step_ms,
           "loop_samples_per_s": got / n_batches / loop_ms * 1e3}
    if pure_step_ms:
        out["gpu_wait_fraction"] = max(0.0, 1 - pure_step_ms / loop_ms)
    return out
