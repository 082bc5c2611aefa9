#!/usr/bin/env bash
# Create .venv (once) with everything distseg needs; sourced by tools/demo.sh and tools/test.sh.
# torch/torchvision are pinned to the builds that work together here (see docs/ARCHITECTURE.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISTSEG_VENV:-$ROOT/.venv}"
STAMP="$VENV/.distseg-installed"
want="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"  # what to install changed
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "setting up $VENV (first run: a few minutes, several GB for the torch build)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    torch==2.14.1 torchvision==0.29.1 nvidia-dali-cuda120 accelerate webdataset wids tensorboard click pyyaml \
    pillow numpy tqdm pytest ruff s3fs 'moto[server]' filelock selenium matplotlib onnx onnxscript onnxruntime 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/pip" install -q --disable-pip-version-check cityscapesscripts 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import torch, torchvision, accelerate, webdataset, nvidia.dali, click, cityscapesscripts, s3fs, moto, onnx, onnxruntime, distseg" \
    || { echo "error: the virtual environment in $VENV is incomplete; remove it and run again" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
