#!/usr/bin/env bash
# The whole test suite, set-up included: bash tests/run.sh [pytest args]
# First the linter (ruff, configured in pyproject.toml: line length 120): the code must be clean
# and formatted (`ruff check --fix . && ruff format .` fixes most findings), then pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/setup.sh"
cd "$repo"
ruff check --quiet .
ruff format --check --quiet .
exec python -m pytest "$@"
