#!/usr/bin/env bash
# Run the test suite (creates .venv on first use) in parallel, one pytest worker per core (TEST_WORKERS=N to
# choose). Extra arguments go to pytest, e.g. tools/test.sh -k shard
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup-venv.sh
# the report's browser test drives Debian's headless Chromium; install it once where we may (CI runs as root)
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium + chromium-driver (apt) for the report's browser test" >&2
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } ||
    echo "note: chromium could not be installed; the browser test will say so and skip" >&2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ruff check distseg tests   # lint first: pyflakes, import order, line length, docstrings (pyproject.toml)
exec python -m pytest -q -rs -n "${TEST_WORKERS:-auto}" --dist loadgroup "$@"
