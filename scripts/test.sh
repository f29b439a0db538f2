#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: the README's test command.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv
# the tests also cover train --float8, which needs the fp8 extra (torchao; the demo's install leaves it out)
.venv/bin/python -m pip install -q -e ".[fp8]"
export OMP_WAIT_POLICY=PASSIVE
exec .venv/bin/python -m pytest -q "$@"
