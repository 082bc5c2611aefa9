#!/usr/bin/env bash
# One command for whoever holds a GPU (no network needed): prints the machine, makes its own Cityscapes-size
# synthetic data, runs the GPU tests and the benchmarks, and writes one Markdown report (gpu-report.md).
#
#   tools/gpu-check.sh                       # the default on a GPU, --quick: GPU tests, step variants vs plain
#                                            # PyTorch, loader feeds
#   tools/gpu-check.sh --phases data,eval,train,tune   # the rest, as further calls on the same machine
#   tools/gpu-check.sh --phases tests,step,loader,data,eval,train,tune --out report.md
#   tools/gpu-check.sh --wheels DIR ...      # install wheels from DIR first (pip --no-index), e.g. DALI
#   tools/gpu-check.sh --dry-run             # every phase (unless --phases picks) on the CPU, tiny sizes:
#                                            # what the test suite runs
#
# Python: the repository's .venv if there is one, else python3 with this checkout on PYTHONPATH (a GPU
# image with torch but no distseg install); DALI may come from a folder on PYTHONPATH or from --wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${DISTSEG_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "${DISTSEG_VENV:-$ROOT/.venv}/bin/python" ]; then PY="${DISTSEG_VENV:-$ROOT/.venv}/bin/python"; else PY=python3; fi
fi
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) shift; "$PY" -m pip install -q --no-index --find-links "$1" "$1"/*.whl; shift ;;
    --wheels=*) dir="${1#--wheels=}"; "$PY" -m pip install -q --no-index --find-links "$dir" "$dir"/*.whl; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec "$PY" -m distseg bench gpu-check "${args[@]}"
