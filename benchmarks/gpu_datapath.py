"""The loader side of the GPU benchmark on compact text features (issue 33; gpu_bench.py runs it
as the part `datapath-compact`): the trainer's streaming loader (t2i.loader.make_loader over
t2i.data.StreamingFeatureDataset) reading synthetic T5-XXL-shaped feature shards whose text is
float16, then int8 (one byte a value + a scale per token, decoded to float16 in the loader's
workers: t2i.text_codec), each feeding the compiled training step: samples/s the loader
delivers alone, ms per step fed by it, and the fraction of the step the GPU waits.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import gpu_train as gt

TEXT_DTYPES = ("float16", "int8")
WORKERS = (2, 4)


def write_sets(root: Path, st: gt.Setting, rows: int) -> dict[str, Any]:
    """One synthetic feature set per text dtype (the same latents and sizes): its directory,
    seconds to write and bytes on disk."""
    from benchmarks.data_bench import write_synthetic_features

    sets = {}
    for dtype in TEXT_DTYPES:
        t = time.perf_counter()
        d = write_synthetic_features(root / dtype, rows, tokens=st.tokens, channels=st.channels,
                                     latent=(4, st.latent, st.latent), text_dtype=dtype)
        sets[dtype] = {"dir": str(d), "write_s": time.perf_counter() - t,
                       "bytes_per_row": sum(p.stat().st_size for p in d.glob("*.parquet")) / rows}
    return sets


def loaders(sets: dict[str, Any], st: gt.Setting):
    """(name, factory of an endless Batch iterator) for each text dtype and worker count."""
    from t2i.data import StreamingFeatureDataset
    from t2i.loader import make_loader

    for workers in WORKERS:
        for dtype in TEXT_DTYPES:
            def make(d=sets[dtype]["dir"], workers=workers):
                return iter(make_loader(StreamingFeatureDataset(d, st.tokens), 0, 0, st.batch, workers=workers, epochs=None))
            yield f"{dtype} text, streaming loader, {workers} workers", make


def part_datapath_compact(run) -> None:
    """gpu_bench part: the loaders of `loaders` feeding the ours-compile step (the one the run
    kept, or one built here, timed alone first); the JSON is rewritten after each loader."""
    st = run.st
    held = run.kept
    pure = next((r["step_ms"] for r in run.report["results"] if r["name"] == "ours-compile"), None)
    if held is None:
        r, held = gt.run_variant("ours-compile", st, st.latent, st.batch, run.peak, None, keep=True)
        pure = r.step_ms
    out: dict[str, Any] = {"rows": st.batch * 12, "pure_step_ms": pure}
    run.report["datapath-compact"] = out
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_sets(Path(tmp), st, out["rows"])
        out["sets"] = {k: {f: v for f, v in s.items() if f != "dir"} for k, s in sets.items()}
        for name, batches in loaders(sets, st):
            t = time.perf_counter()
            out[name] = gt.datapath(held[0], batches(), st, n_batches=8, pure_step_ms=pure)
            out[name]["wall_s"] = time.perf_counter() - t
            print(f"  datapath-compact {name}: {out[name]}", flush=True)
            run.save()
    held = None
    gt.free(st.device)
