#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs requirements.txt into it and the project itself (`pip install -e .`,
# which puts the `fsad` command in .venv/bin and makes every package importable from anywhere). Skipped when
# requirements.txt and pyproject.toml are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into .venv (the first time takes several minutes: torch is large)"
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  echo "[setup] installing the project (pip install -e .): the fsad command"
  # dependencies are exactly requirements.txt (pyproject.toml reads them from it), installed just above
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
