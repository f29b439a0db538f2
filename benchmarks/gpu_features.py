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
