#!/usr/bin/env bash
# Create .venv (once) with everything distseg needs; sourced by tools/demo.sh and tools/test.sh.
# The exact versions come from tools/constraints.txt (the one place to bump them); pyproject.toml holds
# the ranges users install with. Any change to the three files reinstalls.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTSEG_VENV:-$ROOT/.venv}"
STAMP="$VENV/.distseg-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/tools/constraints.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "setting up $VENV (first run: a few minutes, several GB for the torch build)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/tools/constraints.txt" \
    setuptools -e "$ROOT[dali,storage,report,export,timm,trackers,test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import torch, torchvision, accelerate, webdataset, nvidia.dali, click, cityscapesscripts, s3fs, moto, onnx, onnxruntime, matplotlib, selenium, scipy, timm, wandb, mlflow, distseg" \
    || { echo "error: the virtual environment in $VENV is incomplete; remove it and run again" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
