#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU. Extra arguments go to pytest.
# The report's browser test needs Debian's chromium: installed here when missing (root or passwordless sudo).
# FSAD_REQUIRE_CHROMIUM=0 lets the suite skip that test instead of failing where chromium cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  echo "[test] installing chromium (Debian package) for tests/report/test_browser.py"
  sudo=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
                >/dev/null 2>&1; }
  install || { $sudo apt-get update -qq >/dev/null 2>&1 && install; } \
    || echo "[test] could not install chromium (apt-get failed); the browser test will fail" >&2
fi
export FSAD_REQUIRE_CHROMIUM=${FSAD_REQUIRE_CHROMIUM:-1}
[ "$FSAD_REQUIRE_CHROMIUM" = "0" ] && unset FSAD_REQUIRE_CHROMIUM
export CUDA_VISIBLE_DEVICES=""  # the suite is CPU-only by design
exec .venv/bin/python -m pytest "$@"
