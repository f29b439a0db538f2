"""Captioner at real size on a GPU (issue 7): the transformers backend on a randomly initialised
LLaVA-1.5-7B-shaped model, and whether our image preparation keeps the GPU fed.

No weights can be downloaded on the GPU machine, so the model has LLaVA-1.5-7B's exact shapes
(CLIP ViT-L/14-336 + Llama-2-7B, 576 image tokens) with random weights. Random weights rarely
emit EOS, so every caption runs to `max_new_tokens`: a fixed, comparable amount of work.

- images/s at batch sizes 1..64 (`bench_batches`), generation only, images already prepared;
- host wait (`bench_host_wait`): the real `run_caption` job on SAM-sized JPEGs; the share of
  wall time the model is NOT inside `generate` is time the GPU waits on the host (image
  decode, processor, shard writing).
Called by benchmarks/gpu_bench.py; `--smoke` runs the same code on a tiny model on CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SMOKE = dict(image_size=32, patch_size=8)
REAL = dict(image_size=336, patch_size=14)


def llava15_7b_config(image_token_id: int, pad_id: int, bos_id: int, eos_id: int):
    """LlavaConfig with llava-hf/llava-1.5-7b-hf's shapes (vocab 32064, 576 image tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576,
                       projector_hidden_act="gelu")


def build_captioner(device: str, smoke: bool, workdir: Path):
    """A TransformersCaptioner over a random model: LLaVA-1.5-7B-shaped (fp16 on GPU) or tiny."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from autolabel.backends import TransformersCaptioner
    from tiny.llava import build_tiny_llava

    # The tiny builder gives a local tokenizer + processor + chat template at the right image size.
    tiny = build_tiny_llava(workdir / "llava", **(SMOKE if smoke else REAL))
    processor = AutoProcessor.from_pretrained(tiny)
    if smoke:
        model = LlavaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
        name = "tiny-random-llava"
    else:
        tok = processor.tokenizer
        cfg = llava15_7b_config(tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)  # random init directly on the GPU: seconds
        model = model.to(torch.float16)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        name = "random-llava-1.5-7b-shape"
    return TransformersCaptioner.from_loaded(model.eval(), processor, name, device=device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_batches(cap, device: str, batch_sizes: list[int], max_new_tokens: int, image_size: int) -> list[dict[str, Any]]:
    """images/s and generated tokens/s of `caption()` per batch size (prepared images)."""
    from PIL import Image

    from autolabel.backends import GenParams

    params = GenParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    warm = GenParams(temperature=0.0, max_new_tokens=2, seed=0)  # kernels and allocator, not a full caption
    img = Image.new("RGB", (image_size, image_size), (120, 80, 200))
    prompt = cap.format_prompt("Describe this image and its style in a very detailed manner")
    rows = []
    for bs in batch_sizes:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            cap.caption([img] * bs, [prompt] * bs, warm)
            _sync(device)
            t = time.perf_counter()
            gens = cap.caption([img] * bs, [prompt] * bs, params)
            _sync(device)
            dt = time.perf_counter() - t
        except torch.OutOfMemoryError:
            rows.append({"batch": bs, "oom": True})
            torch.cuda.empty_cache()
            break
        toks = sum(g.num_tokens for g in gens)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        rows.append({"batch": bs, "images_per_s": bs / dt, "tokens_per_s": toks / dt, "seconds": dt, "peak_mem_gib": mem})
    return rows


def _inputs(cap, bs: int, image_size: int) -> dict[str, torch.Tensor]:
    from PIL import Image

    img = Image.new("RGB", (image_size, image_size), (120, 80, 200))
    prompt = cap.format_prompt("Describe this image and its style in a very detailed manner")
    inputs = cap.processor(images=[img] * bs, text=[prompt] * bs, return_tensors="pt", padding=True)
    return {k: (v.to(cap.device, cap.model.dtype) if v.is_floating_point() else v.to(cap.device)) for k, v in inputs.items()}


@torch.inference_mode()
def bench_decode(cap, device: str, image_size: int, batch_sizes=(1, 64), tokens: int = 16) -> list[dict[str, Any]]:
    """Why decoding is slow: per generated token, the host's wall time against the time the GPU
    spends in kernels (torch.profiler). Busy << wall means the GPU waits on Python/launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for bs in batch_sizes:
        inputs = _inputs(cap, bs, image_size)
        kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=cap.pad_id)
        cap.model.generate(**inputs, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        _sync(device)
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            cap.model.generate(**inputs, **kw)
            _sync(device)
        wall = time.perf_counter() - t
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        launches = sum(e.count for e in kernels)
        rows.append({"batch": bs, "tokens": tokens, "wall_ms_per_token": wall / tokens * 1e3,
                     "gpu_busy_ms_per_token": busy / tokens * 1e3, "kernels_per_token": launches / tokens,
                     "note": "profiled (profiler overhead included in wall)"})
    return rows


@torch.inference_mode()
def bench_static(cap, device: str, image_size: int, bs: int, tokens: int) -> dict[str, Any]:
    """generate() with a static KV cache, which transformers compiles (CUDA graphs): the second call
    is timed, against the default dynamic cache at the same batch and length."""
    inputs = _inputs(cap, bs, image_size)
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=cap.pad_id)
    out = {"batch": bs, "tokens": tokens}
    for name, extra in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
        t = time.perf_counter()
        cap.model.generate(**inputs, **kw, **extra)  # warm-up; compiles for the static cache
        _sync(device)
        out[f"{name}_first_call_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cap.model.generate(**inputs, **kw, **extra)
        _sync(device)
        dt = time.perf_counter() - t
        out[f"{name}_images_per_s"] = bs / dt
        out[f"{name}_ms_per_token"] = dt / tokens * 1e3
    return out


def bench_host_wait(cap, device: str, n_images: int, batch_size: int, max_new_tokens: int, workdir: Path, sam_size: tuple[int, int]) -> dict[str, Any]:
    """The real caption job on SAM-sized JPEGs: wall time vs time inside `model.generate`."""
    from autolabel.api import run_caption
    from benchmarks.caption_bench import sam_like_jpeg

    src = workdir / "sam"
    src.mkdir(parents=True, exist_ok=True)
    distinct = [sam_like_jpeg(i, *sam_size) for i in range(min(n_images, 8))]  # ~0.5 s each to make
    for i in range(n_images):  # every file is decoded on its own, so repeated bytes cost the same
        (src / f"sa_{i}.jpg").write_bytes(distinct[i % len(distinct)])
    inner = cap.model.generate
    in_generate = [0.0]

    def timed_generate(*a, **kw):  # measurement hook on this instance only
        t = time.perf_counter()
        out = inner(*a, **kw)
        _sync(device)
        in_generate[0] += time.perf_counter() - t
        return out

    cap.model.generate = timed_generate
    try:
        t = time.perf_counter()
        summary = run_caption([src], workdir / "out", captioner=cap, temperature=0.0, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, shard_size=max(batch_size, 64), progress=False)
        wall = time.perf_counter() - t
    finally:
        cap.model.generate = inner
    return {"images": summary.captioned, "failed": summary.failed, "wall_s": wall, "generate_s": in_generate[0],
            "gpu_wait_fraction": 1 - in_generate[0] / wall, "images_per_s": summary.captioned / wall}


def bench_captioner(device: str, smoke: bool, batch_sizes: list[int] | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Both captioner measurements; returns a JSON-ready dict."""
    batch_sizes = batch_sizes or ([1, 2, 4] if smoke else [1, 8, 32, 64])
    max_new_tokens = max_new_tokens or (8 if smoke else 128)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cap = build_captioner(device, smoke, tmp)
        size = (SMOKE if smoke else REAL)["image_size"]
        batches = bench_batches(cap, device, batch_sizes, max_new_tokens, size)
        best = max((r for r in batches if not r.get("oom")), key=lambda r: r["images_per_s"])
        wait = bench_host_wait(cap, device, n_images=2 * best["batch"] if not smoke else 8, batch_size=best["batch"],
                               max_new_tokens=max_new_tokens, workdir=tmp, sam_size=(300, 450) if smoke else (1500, 2250))
        cap.close()
    return {"model": cap.model_name, "max_new_tokens": max_new_tokens, "batches": batches, "host_wait": wait}


def markdown(result: dict[str, Any]) -> str:
    """The captioner part of the GPU table."""
    lines = [f"Captioner: `{result['model']}`, transformers backend, {result['max_new_tokens']} new tokens per image (random weights never stop early).", "",
             "| batch | images/s | tokens/s | peak GiB |", "|---|---|---|---|"]
    for r in result["batches"]:
        if r.get("oom"):
            lines.append(f"| {r['batch']} | OOM | | |")
        else:
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            lines.append(f"| {r['batch']} | {r['images_per_s']:.2f} | {r['tokens_per_s']:.0f} | {mem} |")
    w = result["host_wait"]
    lines += ["", f"Full job on {w['images']} SAM-sized JPEGs: {w['images_per_s']:.2f} images/s; the model was inside "
              f"`generate` for {w['generate_s']:.1f} of {w['wall_s']:.1f} s, so the GPU waited on the host "
              f"**{100 * w['gpu_wait_fraction']:.0f}%** of the time."]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the harness, measures nothing real")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = bench_captioner(dev, smoke=args.smoke or dev == "cpu")
    print(json.dumps(res, indent=1))
    print(markdown(res))
