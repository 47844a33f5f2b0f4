#!/usr/bin/env bash
# The whole test suite, set-up included: bash tests/run.sh [pytest args]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup.sh"
cd "$repo"
exec python -m pytest "$@"
