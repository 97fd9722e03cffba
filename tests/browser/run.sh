#!/usr/bin/env bash
# Headless browser test of the web page against a real magpie server.
#   bash tests/browser/run.sh [PATH_TO_MAGPIE_BINARY] [run.mjs options…]
# The binary defaults to target/debug/magpie; this script builds nothing. It installs
# Chromium (Debian package, as root) when missing and the pinned playwright-core (npm ci).
set -euo pipefail
cd "$(dirname "$0")/../.."

magpie="${1:-target/debug/magpie}"
shift $(( $# > 0 ? 1 : 0 ))
if [[ ! -x "$magpie" ]]; then
  echo "run.sh: no magpie binary at $magpie (build it first, e.g. cargo build)" >&2
  exit 1
fi

for tool in node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "run.sh: $tool is needed (Node.js 20 or newer)" >&2
    exit 1
  fi
done
if (( $(node -p 'process.versions.node.split(".")[0]') < 20 )); then
  echo "run.sh: Node.js 20 or newer is needed (found $(node --version))" >&2
  exit 1
fi

have_chromium() {
  if [[ -n "${CHROMIUM:-}" ]]; then [[ -x "$CHROMIUM" ]]; return; fi
  local c
  for c in /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
    [[ -x "$c" ]] && return 0
  done
  return 1
}

if ! have_chromium; then
  if [[ -n "${CHROMIUM:-}" ]]; then
    echo "run.sh: CHROMIUM=$CHROMIUM is not an executable" >&2
    exit 1
  fi
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "run.sh: installing chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium
  else
    echo "run.sh: Chromium not found. Install it (e.g. 'sudo apt-get install chromium') or set CHROMIUM=/path/to/chrome" >&2
    exit 1
  fi
fi

npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
node tests/browser/run.mjs --magpie "$magpie" "$@"
