#!/usr/bin/env bash
# The whole test suite: lint, types, unit tests, then integration tests on real vLLM (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
PY=${ICHAT_VENV:-.venv}/bin/python
"$PY" -m ruff check ichat tests bench scripts
"$PY" -m mypy
"$PY" -m pytest tests/unit -q -p no:cacheprovider
"$PY" -m pytest tests/integration -v -p no:cacheprovider --durations=15 -m "not slow" "$@"
