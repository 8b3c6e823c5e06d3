#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA device (CI has none and skips these tests with the reason):
# the CUDA tests (FLS prune / quantize on the GPU against the CPU run) and the quantize cost of the
# byte classifier with FLS, the CLI's default method, calibrating on the GPU.
#   OUT=dir PY=python3 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fls-gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONHASHSEED=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, onnxruntime; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__)"
"$PY" -m pytest -q -p no:cacheprovider -rA tests/test_gpu.py "tests/test_options.py::test_device_option" 2>&1 | tee "$OUT/tests.log" | tail -15
"$PY" benchmarks/quantize_cost.py --models byte_classifier --rows "ort quantize_static,ours gptq W8A8,ours fls W8A8" \
    --device cuda --repeat 1 --tag _cuda --out "$OUT" 2>&1 | grep -v Warning | tail -12
