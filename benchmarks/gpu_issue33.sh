#!/usr/bin/env bash
# Issue 33's GPU run, in one device call (about 11 minutes of the 15: start, ~9 of parts, transfers).
# Here first:   bash scripts/gpu_wheels.sh    (the wheels the GPU image lacks, into .whl/)
# Then the device tool's run, with carry [".whl"] and timeout_s 600:
#   bash benchmarks/gpu_issue33.sh
# It writes $OUT/gpu_bench_run3.json after every part and, at the end, $OUT/BENCHMARKS.md with the
# gpu_bench section rendered beside runs 1 and 2; copy both back into benchmarks/results/ and the repo.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/gpu_bench.py --only issue33 --budget "${BUDGET:-500}" --json "$OUT/gpu_bench_run3.json"
python benchmarks/gpu_bench.py --report benchmarks/results/gpu_bench_run1.json,benchmarks/results/gpu_bench_run2.json,"$OUT/gpu_bench_run3.json" \
    && cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
