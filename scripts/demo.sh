#!/usr/bin/env bash
# The main job on a fresh machine: install, generate a tiny model, start a worker,
# ask it one chat question with the official openai client, print the answer, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
PY=${ICHAT_VENV:-.venv}/bin/python
MODEL=${ICHAT_DEMO_MODEL:-.cache/tiny-model}
[ -f "$MODEL/config.json" ] || "$PY" -m ichat make-test-model "$MODEL"
exec "$PY" scripts/demo.py --model-path "$MODEL" "$@"
