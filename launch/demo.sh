#!/usr/bin/env bash
# The README's first command: set-up (.venv, install) then `mapdet demo` on synthetic data.
#   bash launch/demo.sh [--out DIR] [other `mapdet demo` options]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup.sh"
cd "$repo"
exec python -m mapdet demo "$@"
