"""BENCHMARKS.md "gpu_bench" from the JSON of GPU runs of benchmarks/gpu_bench.py.

    python benchmarks/gpu_report.py benchmarks/results/gpu_bench_run1.json benchmarks/results/gpu_bench_run2.json

The figures come from the JSON files alone; the "why" beside each prediction comes from
benchmarks/results/gpu_analysis.json, written by hand after looking at the run (METHOD.md: predict,
measure, look back), keyed by part name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import write_section  # noqa: E402

ANALYSIS = Path(__file__).resolve().parent / "results" / "gpu_analysis.json"
TABLE_HEAD = ["| run | variant | size | batch | ms/step | images/s | MFU (989 TFLOP/s datasheet) | MFU (measured matmul ceiling) | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|"]


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def train_rows(tag: str, report: dict) -> list[str]:
    rows = []
    for r in report["results"]:
        rows.append(f"| {tag} | {r['name']} | {r['latent'] * 8} px | {r['batch']} | {_f(r['step_ms'], '.1f')} | "
                    f"{_f(r['images_per_s'], '.1f')} | {_f(r['mfu'], '.1%')} | {_f(r['mfu_measured'], '.1%')} | "
                    f"{_f(r['peak_mem_gib'], '.1f')} |")
    return rows


def profile_md(p: dict) -> list[str]:
    cats = dict(p["categories_ms_per_step"])
    # a record_function range (name with '#', e.g. Optimizer.step#AdamW.step) on the device timeline
    # spans kernels that are counted on their own: take it out (gpu_train.profile_calls now skips them)
    ranges = [t for t in p["top"] if "#" in t["kernel"]]
    for t in ranges:
        cats[t["category"]] -= t["ms_per_step"]
    total = sum(cats.values()) or 1
    lines = [f"Device time per step {total:.1f} ms in {p['kernels'] - len(ranges)} distinct kernels"
             + (f" ({', '.join(t['kernel'] for t in ranges)} removed: a profiler range counted twice)" if ranges else "") + ":",
             "", "| category | ms/step | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {ms / total:.0%} |" for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
    lines += ["", "| kernel | category | ms/step | calls/step |", "|---|---|---|---|"]
    lines += [f"| `{t['kernel'][:70]}` | {t['category']} | {t['ms_per_step']:.2f} | {t['calls_per_step']:.0f} |"
              for t in p["top"] if t not in ranges][:10]
    return lines


def datapath_md(d: dict) -> list[str]:
    lines = [f"{d['rows']} synthetic rows (T5-XXL-shaped text, 256 px latents) in real feature shards.", "",
             "| loader | samples/s delivered to the GPU (alone) | ms/step fed by it | ms/step alone | GPU waits |", "|---|---|---|---|---|"]
    for name, v in d.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['loader_samples_per_s']:.0f} | {v['loop_step_ms']:.1f} | {_f(v['pure_step_ms'], '.1f')} | "
                         f"{_f(v.get('gpu_wait_fraction'), '.0%')} |")
    return lines


def features_md(f: dict) -> list[str]:
    return ["| encoder | GFLOP per item | items/s | MFU |", "|---|---|---|---|",
            f"| SD-VAE encoder, {f['resolution']} px | {f['vae_gflop_per_image']:.0f} | {f['vae_images_per_s']:.0f} | {_f(f.get('vae_mfu'), '.0%')} |",
            f"| T5-XXL encoder ({f['t5_params'] / 1e9:.2f}B), {f['tokens']} tokens | {f['t5_gflop_per_caption']:.0f} | "
            f"{f['t5_captions_per_s']:.0f} | {_f(f.get('t5_mfu'), '.0%')} |", "",
            f"Both encoders, one after the other, batch {f['batch']}, {f['dtype']}: **{f['gpu_hours_per_10m']:.1f} GPU-hours "
            f"per 10M images** on this device."] + [
            f"- {name} device time by kernel category: " + ", ".join(f"{c} {ms:.1f} ms" for c, ms in f[key]["categories_ms_per_step"].items())
            for name, key in (("VAE encoder (batch)", "vae_profile"), ("T5 encoder (batch)", "t5_profile")) if key in f]


def datapath_compact_md(d: dict) -> list[str]:
    """The datapath-compact part: the streaming loader on float16 vs int8 text features."""
    sets = d.get("sets", {})
    lines = [f"{d['rows']} synthetic rows per text dtype (T5-XXL-shaped, random), "
             + ", ".join(f"{k} {v['bytes_per_row'] / 1e3:,.0f} kB a row on disk" for k, v in sets.items())
             + "; int8 is decoded to float16 in the loader's workers.", "",
             "| loader | samples/s delivered to the GPU (alone) | ms/step fed by it | ms/step alone | GPU waits |", "|---|---|---|---|---|"]
    for name, v in d.items():
        if isinstance(v, dict) and "loader_samples_per_s" in v:
            lines.append(f"| {name} | {v['loader_samples_per_s']:.0f} | {v['loop_step_ms']:.1f} | {_f(v['pure_step_ms'], '.1f')} | "
                         f"{_f(v.get('gpu_wait_fraction'), '.0%')} |")
    return lines


def _rate_rows(part: dict, label: str, unit: str, keys: list[str]) -> list[str]:
    return [f"| {label}, {k} | {part[k][unit]:.0f} | {_f(part[k].get('mfu'), '.0%')} |" for k in keys if k in part]


def features_tuned_md(r: dict) -> list[str]:
    """The features-layout / -t5-compile / -compact parts (the features job's own path:
    t2i.feature_encoder.FeatureEncoder) and the best combination's GPU-hours."""
    lay, t5c, cmp_ = (r.get(k) or {} for k in ("features-layout", "features-t5-compile", "features-compact"))
    lines = ["| features job path | items/s | MFU |", "|---|---|---|"]
    lines += _rate_rows(lay, "VAE encoder (posterior to the host)", "images_per_s", ["nchw", "channels_last", "compiled", "compiled channels_last"])
    lines += _rate_rows(t5c, "T5 encoder (tokenise, encode, store, to the host)", "captions_per_s",
                        ["eager float16", "eager int8", "compiled float16", "compiled int8"])
    lines += _rate_rows(cmp_, "T5 encoder eager, stored", "captions_per_s", ["float16", "int8 on device", "int8 on host"])
    lines += [f"| the job's whole batch (VAE, T5, rows, Parquet shards), {k} | {v:.0f} | - |" for k, v in cmp_.get("job_images_per_s", {}).items()]
    if lay:
        lines.append(f"\nchannels_last / NCHW: **{lay['speedup']:.2f}x**; compiled / NCHW eager: "
                     f"**{lay.get('speedup_compiled', float('nan')):.2f}x** (batch {lay['batch']}, {lay['resolution']} px, {lay['dtype']}).")
    if t5c:
        lines.append(f"Compiled / eager T5 (float16): **{t5c['speedup']:.2f}x**; first compiled call {_f(t5c.get('compile_s'), '.0f')} s.")
    if cmp_:
        lines.append(f"int8 quantised on the device / on the host: **{cmp_['speedup_vs_host']:.2f}x**; device-to-host bytes per caption "
                     + ", ".join(f"{k} {cmp_[k]['d2h_bytes']:,}" for k in ("float16", "int8 on device", "int8 on host"))
                     + f"; device codes differ from the host's in {cmp_['codes_mismatch_fraction']:.2%} of values, "
                     f"scales {'equal' if cmp_['scales_equal'] else 'differ'}.")
    best = r.get("features-best")
    if best:
        lines.append(f"Best combination (VAE {best['vae']}, T5 {best['text']}): **{best['gpu_hours_per_10m']:.1f} GPU-hours per 10M "
                     f"images** at {lay.get('resolution', 256)} px" + (f", against {best['default_gpu_hours_per_10m']:.1f} with the defaults (NCHW, eager, "
                                                 "float16) on the same path" if "default_gpu_hours_per_10m" in best else "") + ".")
    return lines


def captioner_md(report: dict) -> list[str]:
    from benchmarks.gpu_captioner import markdown

    lines = [markdown(report["captioner"])] if report.get("captioner") else []
    for row in report.get("captioner-decode", []):
        lines.append(f"- decode profile, batch {row['batch']}: {row['wall_ms_per_token']:.1f} ms wall per token, the GPU busy "
                     f"{row['gpu_busy_ms_per_token']:.1f} ms of it, {row['kernels_per_token']:.0f} kernels per token")
    s = report.get("captioner-static")
    if s:
        lines.append(f"- static KV cache (transformers compiles the decode step), batch {s['batch']}, {s['tokens']} tokens: "
                     f"{s['static_images_per_s']:.2f} images/s ({s['static_ms_per_token']:.1f} ms/token) against "
                     f"{s['dynamic_images_per_s']:.2f} ({s['dynamic_ms_per_token']:.1f} ms/token) with the default cache; "
                     f"first static call {s['static_first_call_s']:.0f} s (compilation)")
    return lines


def predictions_md(reports: list[dict], analysis: dict[str, str]) -> list[str]:
    from benchmarks.gpu_bench import PREDICTIONS

    preds = {}
    for r in reports:
        preds.update(r.get("predictions", {}))
    preds.update({k: v for k, v in PREDICTIONS.items() if k not in preds})
    lines = ["| part | predicted before the run | why the measurement differs |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {analysis.get(k, '')} |" for k, v in preds.items()]
    return lines


def build(reports: list[dict], analysis: dict[str, str]) -> str:
    first = reports[0]
    fl = first["floor"]
    out = [f"Device: **{first['device']}** (torch {first['torch']}), {len(reports)} runs on this kind of machine; "
           "each figure's run is named. PixArt-XL/2 ({:.0f}M parameters), random weights, synthetic features on the device, "
           "120 T5 tokens x 4096; median of 20 steps after 5 warm-up steps (the slow fp32 reference: 5 after 2), CUDA events.".format(fl["params"] / 1e6), "",
           "Ceilings measured on the device (8192^3 bf16 matmul on random data, datasheet 989 TFLOP/s; 1 GiB copy, read + write): "
           + "; ".join(f"run {i}: {r['ceilings']['matmul_flops'] / 1e12:.0f} TFLOP/s, {r['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s"
                       for i, r in enumerate(reports, 1) if r.get("ceilings"))
           + f". Floor of one step at 256 px, batch 64: {fl['flops_per_step'] / 1e12:.1f} "
           f"TFLOP -> {fl['t_flops_ms']:.0f} ms at run 1's matmul ceiling; >= {fl['bytes_per_step'] / 1e9:.0f} GB -> "
           f"{fl['t_bytes_ms']:.0f} ms: compute-bound.", "", "### Training step", ""] + TABLE_HEAD
    for i, r in enumerate(reports, 1):
        out += train_rows(f"run {i}", r)
    for i, r in enumerate(reports, 1):
        for mb in r.get("max_batch", []):
            out.append(f"\nLargest batch at 256 px (run {i}, eager bf16, doubling search): **{mb['max_batch']}** "
                       f"{'with' if mb['ckpt'] else 'without'} gradient checkpointing, peak {_f(mb['peak_mem_gib'], '.1f')} GiB.")
    for i, r in enumerate(reports, 1):
        if r.get("profile", {}).get("categories_ms_per_step"):  # run 1's first profiler table counted kernels twice
            out += ["", f"### Where the step's time goes (run {i}, ours-compile, torch.profiler)", ""] + profile_md(r["profile"])
        if r.get("sdpa"):
            out += ["", f"### Attention kernels (run {i}; forward + backward, batch 64, 16 heads of 72)", "",
                    "| attention | SDPA kernel | ms |", "|---|---|---|"]
            out += [f"| {s['attention']} | {s['backend']} | {_f(s.get('ms_fwd_bwd'), '.2f') if 'ms_fwd_bwd' in s else 'refused'} |" for s in r["sdpa"]]
        if r.get("datapath"):
            out += ["", f"### Data path (run {i})", ""] + datapath_md(r["datapath"])
        if r.get("features"):
            out += ["", f"### Features encoders (run {i})", ""] + features_md(r["features"])
        if any(r.get(k) for k in ("features-layout", "features-t5-compile", "features-compact")):
            out += ["", f"### Features job speed settings (run {i})", ""] + features_tuned_md(r)
        if r.get("datapath-compact"):
            out += ["", f"### Data path, compact text features (run {i})", ""] + datapath_compact_md(r["datapath-compact"])
        if r.get("captioner") or r.get("captioner-decode") or r.get("captioner-static"):
            out += ["", f"### Captioner (run {i})", ""] + captioner_md(r)
        if r.get("errors"):
            out += ["", f"Errors in run {i}: " + ", ".join(r["errors"])]
    out += ["", "### Predictions and outcomes", ""] + predictions_md(reports, analysis)
    return "\n".join(out) + "\n"


def write_report(*reports: dict[str, Any]) -> None:
    """BENCHMARKS.md's gpu_bench section from GPU runs' JSON (a CPU smoke run's is refused: its
    figures would stand in the GPU table)."""
    if smoke := [i + 1 for i, r in enumerate(reports) if r.get("smoke")]:
        print(f"error: run(s) {smoke} of --report are CPU smoke runs: pass only GPU runs' JSON", file=sys.stderr)
        sys.exit(2)
    analysis = json.loads(ANALYSIS.read_text()) if ANALYSIS.exists() else {}
    where = f"{reports[0]['device']} (the lent GPU machine: 16 CPU cores); report rendered from the runs' JSON"
    write_section("gpu_bench", build(list(reports), analysis), where=where)


if __name__ == "__main__":
    write_report(*(json.loads(Path(p).read_text()) for p in sys.argv[1:]))
