"""The features side of the GPU benchmark (benchmarks/gpu_bench.py runs it): the encoders that
`t2i-data features` runs once per image, at their real config sizes with random weights (no
weights can be downloaded on the GPU machine): the SD VAE encoder (stabilityai/sd-vae-ft-ema's
config) at 256 px and the T5-XXL encoder (google/t5-v1_1-xxl's config, ~4.8B parameters) on 120
tokens, both in bf16. From their rates: GPU-hours to encode 10M images.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def sd_vae(device: str, dtype: torch.dtype, tiny: bool = False):
    """AutoencoderKL with the sd-vae-ft-ema shapes (or a tiny one for the CPU smoke run)."""
    from diffusers import AutoencoderKL

    blocks = (32, 32) if tiny else (128, 256, 512, 512)
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                            up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                            layers_per_block=1 if tiny else 2, latent_channels=4, norm_num_groups=32, sample_size=256)
    return vae.to(dtype).eval().requires_grad_(False)


def t5_xxl_encoder(device: str, dtype: torch.dtype, tiny: bool = False):
    """T5EncoderModel with google/t5-v1_1-xxl's config (gated-GELU, 24 layers, d_model 4096)."""
    from transformers import T5Config, T5EncoderModel

    kw = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4) if tiny else \
        dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    cfg = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   is_encoder_decoder=False, use_cache=False, **kw)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight into bf16: no fp32 copy of 4.8B weights
    try:
        with torch.device(device):
            enc = T5EncoderModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    return enc.eval().requires_grad_(False)


def _timed(fn, device: str, reps: int) -> float:
    """Median seconds per call after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


@torch.no_grad()
def bench_features(device: str, smoke: bool, batch: int = 64, resolution: int = 256, tokens: int = 120,
                   reps: int = 5, images_total: float = 10e6, peak: float | None = None, profile: bool = True) -> dict[str, Any]:
    """Images/s of the VAE encoder and captions/s of the T5 encoder; GPU-hours for `images_total`;
    with `profile`, where each encoder's device time goes (kernel categories)."""
    from benchmarks.gpu_train import profile_calls

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if smoke:
        batch, resolution, reps = 4, 64, 2
    out: dict[str, Any] = {"batch": batch, "resolution": resolution, "tokens": tokens, "dtype": str(dtype)}
    vae = sd_vae(device, dtype, tiny=smoke)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)

    def encode_images():
        d = vae.encode(x).latent_dist
        return d.mean, d.std

    out["vae_gflop_per_image"] = _flops(encode_images) / batch / 1e9
    dt = _timed(encode_images, device, reps)
    out["vae_images_per_s"] = batch / dt
    if profile:
        out["vae_profile"] = profile_calls(encode_images, device, calls=2, rows=8)
    del vae, x
    enc = t5_xxl_encoder(device, dtype, tiny=smoke)
    out["t5_params"] = sum(p.numel() for p in enc.parameters())
    ids = torch.randint(0, 32000, (batch, tokens), device=device)
    mask = torch.ones_like(ids)
    encode_text = lambda: enc(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
    out["t5_gflop_per_caption"] = _flops(encode_text) / batch / 1e9
    dt = _timed(encode_text, device, reps)
    out["t5_captions_per_s"] = batch / dt
    if profile:
        out["t5_profile"] = profile_calls(encode_text, device, calls=2, rows=8)
    del enc
    if device == "cuda":
        torch.cuda.empty_cache()
    per_image_s = 1 / out["vae_images_per_s"] + 1 / out["t5_captions_per_s"]
    out["gpu_hours_per_10m"] = images_total * per_image_s / 3600
    if peak:
        out["vae_mfu"] = out["vae_images_per_s"] * out["vae_gflop_per_image"] * 1e9 / peak
        out["t5_mfu"] = out["t5_captions_per_s"] * out["t5_gflop_per_caption"] * 1e9 / peak
    return out


# ---- issue 33: the job's speed settings, each against its baseline, on the features job's own path ----
# (t2i.feature_encoder.FeatureEncoder over the random-weight models above: the functions
# `t2i-data features` runs for every batch, with the settings the CLI sets)

WORDS = ("a photo of the red blue green small large old young dog cat tree house car street city river mountain "
         "woman man child sitting standing next to near under above in on with wearing holding white black wooden "
         "table window light sky cloud sunset beach field flower painting close-up view background colorful").split()


def bench_captions(n: int, seed: int = 0) -> list[str]:
    """n synthetic captions of 20 to 110 words (one token each with bench_tokenizer: long captions,
    as PixArt's, most of the 120 tokens kept)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 110))) for _ in range(n)]


def bench_tokenizer():
    """A fast T5 tokenizer (Unigram, one piece per word of WORDS) built in memory: the GPU machine
    downloads nothing, and tokenising costs what a T5 tokenizer costs."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -5.0) for w in WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def job_encoder(models: tuple, device: str, batch: int, tokens: int, out: Any = None, **settings):
    """The features job's FeatureEncoder holding `models` (vae, tokenizer, T5 encoder; a None for
    one a part does not run), set up by FeatureEncoder.use_models as `settings` (FeatureConfig
    fields: channels_last, compile_vae, compile_text, text_dtype) ask; writing shards of 2 batches into `out`."""
    from shards.writer import ShardWriter
    from t2i.feature_config import FeatureConfig
    from t2i.feature_encoder import FeatureEncoder
    from t2i.features import feature_schema
    from t2i.text_codec import is_compact

    cfg = FeatureConfig(vae="random weights", text_encoder="random weights", max_tokens=tokens, batch_size=batch,
                        rows_per_shard=2 * batch, **settings)
    writer = out and ShardWriter(out, rows_per_shard=cfg.rows_per_shard, prefix="features",
                                 schema=feature_schema(cfg.caption_fields, compact=is_compact(cfg.text_dtype)))
    enc = FeatureEncoder(writer, cfg, device)
    enc.use_models(*models)
    return enc


# the VAE encoder's ways: (name, channels_last, compile_vae)
VAE_MODES = [("nchw", False, False), ("channels_last", True, False), ("compiled", False, True),
             ("compiled channels_last", True, True)]


def _sizes(device: str, smoke: bool) -> tuple[torch.dtype, int, int, int, int]:
    """(dtype, batch, resolution, tokens, reps) of the features parts."""
    if smoke:
        return torch.float32, 4, 64, 120, 2
    return (torch.bfloat16 if device == "cuda" else torch.float32), 64, 256, 120, 5


@torch.no_grad()
def bench_layout(device: str, smoke: bool, peak: float | None = None) -> dict[str, Any]:
    """The VAE encoder (FeatureEncoder._encode_latents: posterior mean + std to the host) in NCHW,
    with channels_last, compiled (compile_vae) and both (a fresh VAE each: use_models converts and
    compiles in place): images/s and MFU of each, and where the channels_last encoder's device
    time goes."""
    from benchmarks.gpu_train import profile_calls

    dtype, batch, res, tokens, reps = _sizes(device, smoke)
    x = torch.rand(batch, 3, res, res, device=device, dtype=dtype) * 2 - 1
    vae = sd_vae(device, dtype, tiny=smoke)
    gflop = _flops(lambda: vae.encode(x).latent_dist.mean) / batch / 1e9
    out: dict[str, Any] = {"batch": batch, "resolution": res, "dtype": str(dtype), "vae_gflop_per_image": gflop}
    for mode, cl, comp in VAE_MODES:
        torch.manual_seed(0)
        enc = job_encoder((sd_vae(device, dtype, tiny=smoke), None, None), device, batch, tokens, channels_last=cl,
                          compile_vae=comp)
        t = time.perf_counter()
        enc._encode_latents(x)  # a compiled encoder compiles here
        first_s = time.perf_counter() - t
        rate = batch / _timed(lambda: enc._encode_latents(x), device, reps)
        out[mode] = {"images_per_s": rate, "mfu": rate * gflop * 1e9 / peak if peak else None, "first_call_s": first_s}
        if mode == "channels_last":
            prof = profile_calls(lambda: enc._encode_latents(x), device, calls=2, rows=8)
            out["channels_last_profile"] = {"categories_ms_per_step": prof["categories_ms_per_step"], "top": prof["top"][:6]}
    out["speedup"] = out["channels_last"]["images_per_s"] / out["nchw"]["images_per_s"]
    out["speedup_compiled"] = out["compiled"]["images_per_s"] / out["nchw"]["images_per_s"]
    return out


def _text_setup(device: str, smoke: bool):
    """(T5-XXL-shaped encoder, tokenizer, captions of one batch, token ids + mask for FLOP counting)."""
    dtype, batch, _, tokens, _ = _sizes(device, smoke)
    t5, tok, captions = t5_xxl_encoder(device, dtype, tiny=smoke), bench_tokenizer(), bench_captions(batch)
    ids = torch.randint(0, 32000, (batch, tokens), device=device)
    return t5, tok, captions, (ids, torch.ones_like(ids))


def _store_rate(enc, captions: list[str], device: str, reps: int) -> float:
    """Captions/s of FeatureEncoder._store_text: tokenise, encode, store dtype (or quantise), to the host."""
    _, tok, t5 = enc.models
    return len(captions) / _timed(lambda: enc._store_text(tok, t5, captions), device, reps)


@torch.no_grad()
def bench_t5_compile(device: str, smoke: bool, peak: float | None = None) -> dict[str, Any]:
    """The T5 encoder eager, then compiled (compile_text: its blocks, in place), each storing float16
    and int8 (quantised on the device): captions/s, MFU, and the first compiled call's seconds."""
    dtype, batch, _, tokens, reps = _sizes(device, smoke)
    t5, tok, captions, (ids, mask) = _text_setup(device, smoke)
    gflop = _flops(lambda: t5(input_ids=ids, attention_mask=mask)[0]) / batch / 1e9
    out: dict[str, Any] = {"batch": batch, "tokens": tokens, "dtype": str(dtype), "t5_params": sum(p.numel() for p in t5.parameters()),
                           "t5_gflop_per_caption": gflop}
    for mode in ("eager", "compiled"):  # compile_text compiles the encoder in place: eager first
        for text_dtype in ("float16", "int8"):
            enc = job_encoder((None, tok, t5), device, batch, tokens, compile_text=mode == "compiled", text_dtype=text_dtype)
            if mode == "compiled" and "compile_s" not in out:
                t = time.perf_counter()
                enc._store_text(tok, t5, captions)
                out["compile_s"] = time.perf_counter() - t
            rate = _store_rate(enc, captions, device, reps)
            out[f"{mode} {text_dtype}"] = {"captions_per_s": rate, "mfu": rate * gflop * 1e9 / peak if peak else None}
    out["speedup"] = out["compiled float16"]["captions_per_s"] / out["eager float16"]["captions_per_s"]
    return out


def _host_quantised(enc, captions: list[str]):
    """The way before on-device quantisation: float features copied to the host, quantised there."""
    from t2i.encoders import encode_text
    from t2i.text_codec import encode

    _, tok, t5 = enc.models
    emb, mask = encode_text(tok, t5, captions, enc.cfg.max_tokens)
    return encode(emb.cpu(), enc.cfg.text_dtype), mask.cpu()


def _device_vs_host_codes(enc, captions: list[str]) -> dict[str, Any]:
    """The same float features quantised on the device (as _store_text does) and on the host:
    the fraction of codes that differ, and whether the scales are equal."""
    from t2i.encoders import encode_text
    from t2i.text_codec import encode

    _, tok, t5 = enc.models
    emb, _ = encode_text(tok, t5, captions, enc.cfg.max_tokens)
    (codes, scales), (host_codes, host_scales) = encode(emb, enc.cfg.text_dtype), encode(emb.cpu(), enc.cfg.text_dtype)
    return {"codes_mismatch_fraction": (codes.cpu() != host_codes).float().mean().item(),
            "scales_equal": torch.equal(scales.cpu(), host_scales)}


def _job_rate(models: tuple, device: str, out: str, text_dtype: str, sizes: tuple[int, int, int, int]) -> float:
    """Images/s of FeatureEncoder._encode over batches of random pixels and captions: the job's
    whole per-batch path (VAE, T5, quantise, rows, zstd Parquet shards of 2 batches, written
    into `out`). `sizes`: batch, resolution, tokens, shards timed."""
    batch, res, tokens, shards = sizes
    enc = job_encoder(models, device, batch, tokens, out=out, text_dtype=text_dtype)
    group = [({"key": f"k{i}", "caption": c}, torch.rand(3, res, res) * 2 - 1) for i, c in enumerate(bench_captions(batch))]
    for _ in range(2):  # warm-up: one shard written (the writer's first-time costs)
        enc._encode(group)
    t = time.perf_counter()
    for _ in range(2 * shards):
        enc._encode(group)
    return 2 * shards * batch / (time.perf_counter() - t)


@torch.no_grad()
def bench_compact(device: str, smoke: bool, peak: float | None = None) -> dict[str, Any]:
    """Compact text features (int8) on the job's path: the T5 encoder storing float16, int8
    quantised on the device (FeatureEncoder._store_text: codes + scales travel), and int8
    quantised on the host after a copy of the float features (the old way), with device-to-host
    bytes per caption and whether the device's codes equal the host's; then the job's whole
    per-batch path (FeatureEncoder._encode, shards written) in float16 and int8."""
    import tempfile

    dtype, batch, res, tokens, reps = _sizes(device, smoke)
    t5, tok, captions, _ = _text_setup(device, smoke)
    f16, i8 = (job_encoder((None, tok, t5), device, batch, tokens, text_dtype=d) for d in ("float16", "int8"))
    channels = t5.config.d_model
    out: dict[str, Any] = {"batch": batch, "tokens": tokens, "dtype": str(dtype), "host_threads": torch.get_num_threads(),
                           "float16": {"captions_per_s": _store_rate(f16, captions, device, reps), "d2h_bytes": tokens * channels * 2},
                           "int8 on device": {"captions_per_s": _store_rate(i8, captions, device, reps), "d2h_bytes": tokens * (channels + 4)}}
    rate = batch / _timed(lambda: _host_quantised(i8, captions), device, reps)
    out["int8 on host"] = {"captions_per_s": rate, "d2h_bytes": tokens * channels * t5.dtype.itemsize}
    out.update(_device_vs_host_codes(i8, captions))
    out["speedup_vs_host"] = out["int8 on device"]["captions_per_s"] / rate
    vae = sd_vae(device, dtype, tiny=smoke)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = (batch, res, tokens, 1 if smoke else 2)
        out["job_images_per_s"] = {d: _job_rate((vae, tok, t5), device, f"{tmp}/{d}", d, sizes) for d in ("float16", "int8")}
    return out


def best_combination(report: dict[str, Any], images_total: float = 10e6) -> dict[str, Any] | None:
    """GPU-hours per `images_total` images with the fastest VAE layout and the fastest text path
    (eager / compiled, float16 / int8) measured by the parts that ran, against the defaults
    (NCHW, eager, float16) measured by the same parts: None until both encoders have a rate."""
    layout, t5c, compact = (report.get(k) or {} for k in ("features-layout", "features-t5-compile", "features-compact"))
    vae = {k: layout[k]["images_per_s"] for k, _, _ in VAE_MODES if k in layout}
    text = {k: v["captions_per_s"] for k, v in t5c.items() if isinstance(v, dict) and "captions_per_s" in v}
    text.update({f"eager {k.split()[0]}": v["captions_per_s"] for k, v in compact.items()
                 if k in ("float16", "int8 on device") and f"eager {k.split()[0]}" not in text})
    if not vae or not text:
        return None
    hours = lambda v, t: images_total * (1 / v + 1 / t) / 3600  # noqa: E731
    best_vae, best_text = max(vae, key=vae.get), max(text, key=text.get)
    out = {"vae": best_vae, "vae_images_per_s": vae[best_vae], "text": best_text, "text_captions_per_s": text[best_text],
           "gpu_hours_per_10m": hours(vae[best_vae], text[best_text])}
    if report.get("datasheet_peak") and "vae_gflop_per_image" in layout and "t5_gflop_per_caption" in t5c:
        # in plan's terms (costs.plan.FEATURES): `plan --gpu-bench` prices the features job with these
        peak = report["datasheet_peak"]
        out.update(resolution=layout["resolution"], tokens=t5c["tokens"], vae_gflop_per_image=layout["vae_gflop_per_image"],
                   t5_gflop_per_caption=t5c["t5_gflop_per_caption"],
                   vae_mfu=vae[best_vae] * layout["vae_gflop_per_image"] * 1e9 / peak,
                   t5_mfu=text[best_text] * t5c["t5_gflop_per_caption"] * 1e9 / peak)
    if "nchw" in vae and "eager float16" in text:
        out["default_gpu_hours_per_10m"] = hours(vae["nchw"], text["eager float16"])
    return out


def run_part(run, key: str, bench) -> None:
    """A gpu_bench part: `bench` on the run's device into run.report[key], then the best
    combination so far (run.report["features-best"])."""
    from benchmarks.gpu_train import free

    try:
        run.report[key] = bench(run.st.device, run.smoke, peak=run.peak)
    finally:
        torch._dynamo.reset()  # compiled T5 blocks: nothing later needs them
        free(run.st.device)
    print(f"  {key}: " + str({k: v for k, v in run.report[key].items() if "profile" not in k}), flush=True)
    run.report["features-best"] = best_combination(run.report)
    print(f"  features-best: {run.report['features-best']}", flush=True)


# gpu_bench.py's dispatch table entries for the features parts of issue 33
PARTS = {key: (lambda run, key=key, bench=bench: run_part(run, key, bench))
         for key, bench in (("features-layout", bench_layout), ("features-t5-compile", bench_t5_compile),
                            ("features-compact", bench_compact))}
