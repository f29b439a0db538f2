"""Compact text features (text_dtype int8 | fp8, t2i.text_codec; ids: token ids encoded on demand by
the training step, t2i.text_ondemand) against float16, in one run:

1. bytes per sample at T5-XXL's shape (120 tokens x 4096 channels; synthetic values: normals with
   per-token scales and an outlier channel), raw and on disk (zstd Parquet through the real
   ShardWriter in the real feature schema), and the decode error against the float32 values;
2. the real tiny path: the features job (tiny VAE + tiny T5, 32 channels) on the tiny world in
   each dtype, its text bytes per sample and shard bytes;
3. the training loader's samples/s (t2i.loader.make_loader over t2i.data.StreamingFeatureDataset:
   one epoch of global batches of 32, in process and with 2 workers), float16 against compact, at
   the T5-XXL shape, from files in the page cache (so it measures the decode's CPU cost, not the
   disk: at scale the disk or network reads half the bytes);
4. for ids, the compute it moves into the training step: a T5-XXL encoder forward per caption
   (2 x 4.7 B parameters x tokens FLOPs) against PixArt-XL/2's training FLOPs a sample
   (t2i.models.flops_per_image), stated, not timed (no T5-XXL on this machine).

    .venv/bin/python benchmarks/compact_text_bench.py            # writes "compact_text_bench" in BENCHMARKS.md
    .venv/bin/python benchmarks/compact_text_bench.py --quick    # small, prints only
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shards import ShardWriter, complete_shards  # noqa: E402
from t2i.features import feature_schema  # noqa: E402
from t2i.text_codec import IDS, decode, encode, is_compact  # noqa: E402

TOKENS, CHANNELS, LATENT = 120, 4096, (4, 32, 32)
DTYPES = ("float32", "float16", "int8", "fp8", IDS)
LOADED = ("float16", "int8", "fp8", IDS)  # the loader's rows
T5_XXL_PARAMS, T5_VOCAB = 4.7e9, 32128  # the encoder of google/t5-v1_1-xxl; its vocabulary


def t5_like(rng: np.random.Generator) -> torch.Tensor:
    """One caption's synthetic T5-XXL-shaped features (float32): normals, a scale per token, one
    outlier channel 20x the rest (T5 has a few)."""
    x = rng.standard_normal((TOKENS, CHANNELS), np.float32) * rng.uniform(0.05, 0.5, (TOKENS, 1)).astype(np.float32)
    x[:, 42] *= 20
    return torch.from_numpy(x)


def stored(x: torch.Tensor, dtype: str) -> dict:
    """The text columns of one row as the features job writes them (t2i.feature_encoder)."""
    if dtype == IDS:  # a caption's token ids (synthetic: drawn from x's bits, fixed per caption)
        ids = (x[:, 0].view(torch.int32).numpy().astype(np.int64) % T5_VOCAB).astype(np.int32)
        return {"text_emb": ids.tobytes()}
    if is_compact(dtype):
        codes, scales = encode(x, dtype)
        return {"text_emb": codes.numpy().tobytes(), "text_scale": scales.numpy().tobytes()}
    return {"text_emb": x.to(getattr(torch, dtype)).contiguous().view(torch.uint8).numpy().tobytes()}


def write_set(d: Path, n: int, dtype: str, seed: int = 0) -> Path:
    """n synthetic T5-XXL-shaped rows (+ 256 px float32 latents) in the real feature schema."""
    rng = np.random.default_rng(seed)
    w = ShardWriter(d, rows_per_shard=256, schema=feature_schema(("caption",), compact=is_compact(dtype)), prefix="features")
    for i in range(n):
        w.add({"key": f"k{i:06d}", "caption": "synthetic", "height": 256, "width": 256, "latent_shape": list(LATENT),
               "latent_mean": rng.standard_normal(LATENT, np.float32).tobytes(), "latent_std": rng.random(LATENT, np.float32).tobytes(),
               "text_len": TOKENS, "text_channels": 1 if dtype == IDS else CHANNELS, "text_dtype": dtype, "latent_dtype": "float32",
               **stored(t5_like(rng), dtype)})  # fmt: skip
    w.flush()
    return d


def bytes_at_t5_shape(work: Path, n: int) -> list[dict]:
    """Per dtype: raw text bytes a sample, text bytes on disk a sample (zstd Parquet, text columns
    only), and the decode error of the compact ones against float32."""
    import pyarrow.parquet as pq

    rng, out = np.random.default_rng(1), []
    x = t5_like(rng)
    for dtype in DTYPES:
        raw = sum(map(len, stored(x, dtype).values()))
        d = write_set(work / f"bytes-{dtype}", n, dtype)
        md = [pq.ParquetFile(p).metadata for p in complete_shards(d)]
        cols = {"text_emb", "text_scale"}
        disk = sum(m.row_group(g).column(c).total_compressed_size for m in md for g in range(m.num_row_groups)
                   for c in range(m.num_columns) if m.row_group(g).column(c).path_in_schema in cols)
        err = None
        if is_compact(dtype):
            codes, scales = encode(x, dtype)
            got = decode(codes.numpy(), scales.numpy(), dtype).astype(np.float32)
            diff = np.abs(got - x.numpy())
            err = {"max_over_absmax": float((diff.max(1) / np.abs(x.numpy()).max(1)).max()),
                   "rel_rms": float(np.sqrt((diff**2).mean() / (x.numpy() ** 2).mean()))}
        out.append({"dtype": dtype, "raw": raw, "disk": disk / n, "err": err})
        shutil.rmtree(d)
    return out


def tiny_path(work: Path, images: int) -> list[dict]:
    """The features job on the tiny world in each text dtype: text bytes a sample, shard bytes."""
    import pyarrow.parquet as pq

    from t2i.features import FeatureConfig, compute_features
    from tiny.pixart import build_tiny_models
    from tiny.world import simple_corpus, write_simple_world

    models = build_tiny_models(work / "models", simple_corpus(), vae_fit_steps=10)
    write_simple_world(work / "captions", images, rows_per_shard=images)
    rows = []
    for dtype in LOADED:
        cfg = FeatureConfig(vae=models["vae"], text_encoder=models["text_encoder"], resolution=16, max_tokens=16, text_dtype=dtype)
        d = Path(compute_features(work / "captions", work / "feats", cfg, progress=False)["dir"])
        t = pq.read_table(complete_shards(d), columns=[c for c in ("text_emb", "text_scale", "text_len")
                                                       if c in pq.read_schema(complete_shards(d)[0]).names])
        text = sum(len(v) for c in ("text_emb", "text_scale") if c in t.column_names for v in t.column(c).to_pylist())
        rows.append({"dtype": dtype, "text": text / len(t), "tokens": float(np.mean(t.column("text_len").to_numpy())),
                     "shards": sum(os.path.getsize(p) for p in complete_shards(d)) / len(t)})
    return rows


def loader_rate(d: Path, workers: int, epoch: int) -> float:
    """Samples/s of one epoch through make_loader (global batch 32) after its first batch (the
    workers' start is not counted)."""
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    t0, n = None, 0
    for b in make_loader(StreamingFeatureDataset(d, TOKENS), epoch, 0, 32, workers=workers, pin_memory=False):
        assert b.text.dtype == (torch.int32 if b.text.shape[-1] == 1 else torch.float16)
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(b.keys)
    return n / (time.perf_counter() - t0)


def loader_rates(work: Path, n: int, repeats: int) -> dict:
    sets = {dtype: write_set(work / f"load-{dtype}", n, dtype) for dtype in LOADED}
    rates: dict = {}
    for epoch in range(repeats):  # the ways interleaved, so a busy spell of the machine hits them alike
        for workers in (0, 2):
            for dtype, d in sets.items():
                rates[(dtype, workers)] = max(rates.get((dtype, workers), 0.0), loader_rate(d, workers, epoch))
    for d in sets.values():
        shutil.rmtree(d)
    return rates


def _x(ratio: float) -> str:
    """A bytes ratio against float16 (ids' ~0.0005 with enough digits to show)."""
    return f"{ratio:.3f}x" if ratio >= 0.01 else f"{ratio:.5f}x"


def ondemand_cost(t5: list[dict]) -> list[str]:
    """What ids move into the training step: a T5-XXL forward per caption, against PixArt-XL/2's
    training FLOPs a sample (t2i.models.flops_per_image), stated from parameter counts."""
    from t2i.models import flops_per_image

    raw = {r["dtype"]: r["raw"] for r in t5}
    t5_flops = 2 * T5_XXL_PARAMS * TOKENS
    steps = {px: flops_per_image("PixArt-XL/2", (px // 8, px // 8), TOKENS, CHANNELS) for px in (256, 512, 1024)}
    cost = ", ".join(f"{steps[px] / 1e12:.2f} TFLOP at {px} px (+{t5_flops / steps[px]:.0%})" for px in steps)
    return [f"ids store {raw[IDS]:,} bytes a sample at {TOKENS} tokens against float16's {raw['float16']:,} "
            f"({raw[IDS] / raw['float16']:.4%}; int8/fp8: {raw['int8'] / raw['float16']:.1%}): the only option here within "
            "issue 31's quarter of float16's bytes. The price is compute in the training step: a T5-XXL encoder forward per "
            f"caption, 2 x {T5_XXL_PARAMS / 1e9:.1f} B parameters x {TOKENS} tokens = {t5_flops / 1e12:.2f} TFLOP (fewer with "
            f"shorter captions: only tokens up to a batch's longest are encoded), against a PixArt-XL/2 training step's {cost}, "
            "and T5-XXL's weights (9.5 GB in bfloat16) on every training device. Not timed here (no T5-XXL, no GPU)."]


def report(t5: list[dict], tiny: list[dict], rates: dict, n_load: int, repeats: int, load0: float) -> str:
    from benchmarks._report import load_note

    f16 = next(r for r in t5 if r["dtype"] == "float16")
    lines = [f"T5-XXL-shaped text features ({TOKENS} tokens x {CHANNELS} channels, synthetic values: normals with a scale per "
             "token and one outlier channel 20x), one sample, through the real encoder path (t2i.text_codec) and the real "
             "ShardWriter (zstd Parquet):", "",
             "| text_dtype | raw bytes / sample | vs float16 | on disk / sample | vs float16 | max error / row absmax | relative RMS error |",
             "|---|---|---|---|---|---|---|"]
    for r in t5:
        e = r["err"]
        lines.append(f"| {r['dtype']} | {r['raw']:,} | {_x(r['raw'] / f16['raw'])} | {r['disk']:,.0f} | {_x(r['disk'] / f16['disk'])} | "
                     + (f"{e['max_over_absmax']:.5f} | {e['rel_rms']:.4f} |" if e else "- | - |"))
    t16 = next(r for r in tiny if r["dtype"] == "float16")
    lines += ["", f"The real tiny path (the features job, tiny T5 of 32 channels, max_tokens 16, mean {t16['tokens']:.1f} tokens kept "
              "a caption: padding is never stored):", "", "| text_dtype | text bytes / sample | vs float16 | shard bytes / sample |",
              "|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['text']:.0f} | {_x(r['text'] / t16['text'])} | {r['shards']:.0f} |" for r in tiny]
    lines += ["", f"The training loader (make_loader, global batch 32, one epoch of {n_load} T5-XXL-shaped samples + 256 px float32 "
              "latents, from the page cache), samples/s after the first batch (the workers' start not counted), best of "
              f"{repeats} epochs; a ratio > 1 means the stored form loads faster than float16 (ids: the batch holds "
              "token ids, encoded afterwards by the training step):", "",
              "| loader | " + " | ".join(LOADED) + " | " + " | ".join(f"{d} / float16" for d in LOADED[1:]) + " |",
              "|---|" + "---|" * (2 * len(LOADED) - 1)]
    for w in (0, 2):
        r = [rates[(d, w)] for d in LOADED]
        lines.append(f"| {'in process' if w == 0 else f'{w} workers'} | " + " | ".join(f"{v:.0f}" for v in r) + " | "
                     + " | ".join(f"{v / r[0]:.2f}x" for v in r[1:]) + " |")
    lines += ["", "Compact features read half float16's bytes and decode them (a table lookup and a multiply per value, in the "
              "loader's process or workers) into the same float16 batch; from the page cache the decode's CPU cost is what "
              "shows, while at scale (10M samples, cache on disk or object store) the reads halve.", "", *ondemand_cost(t5)]
    lines += ["", load_note(load0)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sets, print only")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="compact-text-"))
    n_bytes, n_load, repeats = (8, 96, 1) if args.quick else (32, 480, 3)
    try:
        t5 = bytes_at_t5_shape(work, n_bytes)
        tiny = tiny_path(work / "tiny", 64 if args.quick else 256)
        rates = loader_rates(work, n_load, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body = report(t5, tiny, rates, n_load, repeats, load0)
    print(body)
    if not args.quick:
        from benchmarks._report import write_section

        print("wrote", write_section("compact_text_bench", body))


if __name__ == "__main__":
    main()
