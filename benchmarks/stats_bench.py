"""Noun counting speed: `t2i-data stats` vs the naive way, on the LAION sample, in one run;
and one worker's memory and speed on dense captions, token-sized vs caption-sized batches.

naive: the full en_core_web_sm pipeline (tok2vec, tagger, parser, attribute_ruler,
       lemmatizer, ner), one process, `nlp.pipe` with its default batch, counting from docs.
ours:  `dataset_stats.run_stats`: tok2vec + tagger only (+ attribute_ruler and lemmatizer with
       --lemma), batches of 4096 tokens, one worker process per core returning noun counts, plus
       language ID of every caption; the whole job (reading and checking the input, pool start,
       model loads, metrics, size-matched subsample) is inside the timing.

Both use the same noun definition (Penn NN/NNS/NNP/NNPS with at least one letter, lowercased);
the parser and NER do not change `token.tag_`, so the counts must be identical, noun by noun.

Dense captions (each 40 LAION captions joined, ~2,300 characters, like a long VLM caption):
one worker (`NounExtractor`) in a fresh process per way, tagging 256 of them sent as one
chunk; peak RSS over the loaded model, and seconds. old: one `nlp.pipe` batch per 256
captions (the former `--batch-size 256`); ours: batches of at most 4096 tokens.

    python benchmarks/stats_bench.py [--limit N] [--workers W]   # writes the "stats_bench" section
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks._data import LAION  # noqa: E402
from benchmarks._report import write_section  # noqa: E402
from dataset_stats.api import StatsOptions, run_stats  # noqa: E402
from dataset_stats.nouns import POS_TAGS, default_workers, load_nlp  # noqa: E402


def naive_counts(captions: list[str]) -> tuple[Counter, int]:
    """The full pipeline, one process, nouns counted from the docs."""
    nlp = load_nlp(full=True)
    tags = set(POS_TAGS["noun+propn"])
    counts: Counter = Counter()
    tokens = 0
    for doc in nlp.pipe(captions):
        tokens += len(doc)
        counts.update(t.lower_ for t in doc if t.tag_ in tags and any(ch.isalpha() for ch in t.text))
    return counts, tokens


DENSE_PROBE = """
import json, resource, sys, time
import pyarrow.parquet as pq
from dataset_stats.nouns import NounConfig, NounExtractor
caps = [c for c in pq.read_table(sys.argv[1], columns=["TEXT"]).column("TEXT").to_pylist() if c]
dense = [" ".join(caps[i * 40 : (i + 1) * 40]) for i in range(256)]
ex = NounExtractor(NounConfig(batch_tokens=int(sys.argv[2])))
ex.extract(["A dog on a sofa."] * 50)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
result = ex.extract(dense)
seconds = time.perf_counter() - t
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
chars = sum(map(len, dense)) / len(dense)
print(json.dumps({"extra_mb": extra, "seconds": seconds, "nouns": sum(result.lengths), "chars": chars}))
"""


def dense_probe(batch_tokens: int) -> dict:
    """One worker tagging 256 dense captions in a fresh process: peak RSS over the model, seconds."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", DENSE_PROBE, str(LAION), str(batch_tokens)], check=True, cwd=root,
                         env=env, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def dense_lines() -> tuple[list[str], bool]:
    from dataset_stats.nouns import DEFAULT_BATCH_TOKENS

    old, ours = dense_probe(10**9), dense_probe(DEFAULT_BATCH_TOKENS)
    same = old["nouns"] == ours["nouns"]
    return [
        "",
        f"Dense captions ({ours['chars']:,.0f} characters each), one worker tagging 256 of them:",
        "",
        "| batches | peak RSS over the loaded model (MB) | seconds | nouns |",
        "|---|---|---|---|",
        f"| old: 256 captions per batch | {old['extra_mb']:,.0f} | {old['seconds']:.1f} | {old['nouns']:,} |",
        f"| ours: at most {DEFAULT_BATCH_TOKENS} tokens per batch | {ours['extra_mb']:,.0f} | {ours['seconds']:.1f} | {ours['nouns']:,} |",
        "",
        f"**Memory: {old['extra_mb'] / max(ours['extra_mb'], 1):.0f}x less** with token-sized batches (old / ours); "
        f"time old / ours: {old['seconds'] / ours['seconds']:.2f}x (above 1: ours faster). Same nouns: **{same}**.",
    ], same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="use only the first N captions (quicker)")
    ap.add_argument("--workers", type=int, default=None, help="our worker processes (default: one per core)")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    captions = pq.read_table(LAION, columns=["TEXT"]).column("TEXT").to_pylist()[: args.limit]
    captions = [c for c in captions if c and c.strip()]
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "laion.parquet"
        pq.write_table(pa.table({"TEXT": captions}), path)

        t0 = time.perf_counter()
        naive, tokens = naive_counts(captions)
        t_naive = time.perf_counter() - t0

        ours: dict[str, int] = {}
        t0 = time.perf_counter()
        report = run_stats([str(path)], StatsOptions(workers=workers, progress=False), on_counts=lambda _, c: ours.update(c))
        t_ours = time.perf_counter() - t0

    identical = dict(naive) == ours
    total_naive, total_ours = sum(naive.values()), sum(ours.values())
    ratio = t_naive / t_ours
    npc = report["datasets"][0]["nouns_per_caption"]["mean"]
    lines = [
        f"LAION sample: {len(captions):,} captions, {tokens:,} spaCy tokens; {workers} worker process(es) for ours. "
        f"Load average when the run started: {load:.1f} on {os.cpu_count()} cores (above the core count, "
        "other jobs take the cores ours would run in parallel on, and the ratio drops towards 1 process's).",
        "",
        "| way | seconds | captions/s | tokens/s | total nouns | distinct nouns |",
        "|---|---|---|---|---|---|",
        f"| naive: full en_core_web_sm, 1 process, counted from docs | {t_naive:.1f} | {len(captions) / t_naive:,.0f} | "
        f"{tokens / t_naive:,.0f} | {total_naive:,} | {len(naive):,} |",
        f"| ours: `t2i-data stats` (tagger only, 4096-token batches, language ID, {workers} workers, whole job) | {t_ours:.1f} | "
        f"{len(captions) / t_ours:,.0f} | {tokens / t_ours:,.0f} | {total_ours:,} | {len(ours):,} |",
        "",
        f"**Speed-up: {ratio:.1f}x** (target: >= 5x on 2 cores). Counts identical noun by noun: **{identical}**. "
        f"Nouns per caption: {npc:.2f} (paper: 6.4 for LAION).",
        "",
        "Ours includes process start, model loads, reading and the metrics; the naive run includes its model load. "
        "Other jobs sharing the cores make single runs noisy.",
    ]
    dense, dense_same = dense_lines()
    lines += dense
    body = "\n".join(lines)
    print(body)
    write_section("stats_bench", body)
    if not dense_same:
        print("MISMATCH: token-sized batches changed the dense captions' nouns", file=sys.stderr)
        sys.exit(1)
    if not identical:
        diff = {w: (naive.get(w, 0), ours.get(w, 0)) for w in set(naive) | set(ours) if naive.get(w, 0) != ours.get(w, 0)}
        print(f"MISMATCH on {len(diff)} nouns, e.g. {list(diff.items())[:10]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
