#!/usr/bin/env bash
# Prometheus and promtool for the observability tests and `ichat up --prometheus`:
# Debian's package (2.42 on bookworm), unpacked into .tools/prometheus -- nothing is
# installed system-wide and no service starts. Idempotent; prints the bin folder.
#   ICHAT_TOOLS  the folder (default: .tools in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${ICHAT_TOOLS:-.tools}
BIN="$TOOLS/prometheus/usr/bin"
if [ -x "$BIN/prometheus" ] && [ -x "$BIN/promtool" ]; then
  echo "$BIN"
  exit 0
fi
command -v apt-get > /dev/null || {
  echo "setup-prometheus: no apt-get; install Prometheus (prometheus.io) and set" \
    "ICHAT_PROMETHEUS and ICHAT_PROMTOOL to its binaries" >&2
  exit 2
}
DL=$(mktemp -d)
trap 'rm -rf "$DL"' EXIT
# apt-get download runs as the _apt user where it can: let it write the folder
chmod 777 "$DL"
(cd "$DL" && apt-get download -q prometheus > /dev/null 2>&1) || {
  apt-get update -q > /dev/null
  (cd "$DL" && apt-get download -q prometheus > /dev/null)
}
mkdir -p "$TOOLS/prometheus"
dpkg-deb -x "$DL"/prometheus_*.deb "$TOOLS/prometheus"
"$BIN/promtool" --version | head -1 >&2
echo "$BIN"
