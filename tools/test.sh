#!/usr/bin/env bash
# Run the test suite (creates .venv on first use). Extra arguments go to pytest, e.g. tools/test.sh -k shard
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup-venv.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ruff check distseg tests   # lint first: pyflakes, import order, line length, docstrings (pyproject.toml)
exec python -m pytest -q -rs "$@"
