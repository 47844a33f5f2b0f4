#!/usr/bin/env bash
# Create .venv (if missing) and install mapdet into it. Sourced by launch/demo.sh and tests/run.sh,
# so each of the README's two commands does all of its own set-up on a fresh clone.
# torch/torchvision: a plain `torch>=2.4` lets the machine's pip take the local build.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MAPDET_VENV:-$repo/.venv}"
stamp="$venv/.mapdet-installed"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv" >&2
  python3 -m venv "$venv"
fi
# Reinstall only when pyproject.toml changed since the last install.
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing mapdet and its dependencies (first run: a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$repo[test]" >&2
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
