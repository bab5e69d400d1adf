#!/usr/bin/env bash
# The whole test suite: lint, types, unit tests, integration tests on real vLLM (CPU),
# then real SGLang (CPU) in its own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# Prometheus and promtool (Debian's package, unpacked): alert rules and a real server
PROM_BIN=$(bash scripts/setup-prometheus.sh)
export ICHAT_PROMETHEUS=${ICHAT_PROMETHEUS:-$PWD/$PROM_BIN/prometheus}
export ICHAT_PROMTOOL=${ICHAT_PROMTOOL:-$PWD/$PROM_BIN/promtool}
PY=${ICHAT_VENV:-.venv}/bin/python
"$PY" -m ruff check ichat tests bench scripts
"$PY" -m mypy
"$PY" -m pytest tests/unit -q -p no:cacheprovider
"$PY" -m pytest tests/integration -v -p no:cacheprovider --durations=15 -m "not slow" "$@"
bash scripts/setup-sglang-env.sh
SGL=${ICHAT_SGLANG_VENV:-.venv-sglang}/bin/python
"$SGL" -m pytest tests/sglang -v -p no:cacheprovider --durations=5 "$@"
