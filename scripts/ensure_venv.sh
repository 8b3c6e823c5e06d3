#!/usr/bin/env bash
# Create (once) the pinned virtual environment for this checkout and print its path.
# The venv lives outside the clone, keyed by a hash of requirements/ci.txt, so CI and fresh
# clones reuse it instead of reinstalling torch on every run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$here/requirements/ci.txt"
key="$( (cat "$req"; python3 -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)"
cache="${FLS_CACHE_DIR:-$HOME/.cache/fls-compress}"
venv="$cache/venv-$key"
if [ ! -f "$venv/.ready" ]; then
  echo "fls-compress: creating virtual environment $venv (one-off, a few minutes)" >&2
  mkdir -p "$cache"
  rm -rf "$venv"   # a half-built venv (no .ready marker) is rebuilt from scratch
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  "$venv/bin/python" -c "import torch, torchvision, onnx, onnxruntime, onnx2torch" >&2
  touch "$venv/.ready"
fi
echo "$venv"
