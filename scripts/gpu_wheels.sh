#!/usr/bin/env bash
# The wheels the lent GPU machine lacks (its image has CUDA torch, transformers, accelerate, pyarrow;
# ../shared/ENVIRONMENT.md), downloaded here into .whl/ (git-ignored) to travel with `carry: [".whl"]`.
# On the GPU machine: pip install --no-deps .whl/*.whl && python benchmarks/gpu_bench.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
.venv/bin/python -m pip download -q --no-deps -d .whl "diffusers>=0.42,<0.43" "peft>=0.21,<0.22" \
    "torchao>=0.18,<0.19" "nvidia-ml-py>=12" "psutil>=5.9" "sentencepiece>=0.2"
du -sh .whl && ls .whl
