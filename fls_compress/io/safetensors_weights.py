"""Substitute weights from a safetensors checkpoint into an ONNX graph before compression.

Exported graphs rarely keep the state-dict names of large weights: the TorchScript and dynamo
exporters store ``nn.Linear`` weights as anonymous, transposed MatMul constants (``onnx::MatMul_15``,
``val_0``). Matching is therefore, for each checkpoint tensor:

1. by exact initializer name (shape must match);
2. otherwise by shape: the unique not-yet-matched float initializer of the same shape, or, for 2-D
   tensors, the unique one of the transposed shape (stored transposed).

Anything ambiguous or unmatched is an error rather than a guess. The ONNX model passed in is not
modified; a copy is returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidDataError
from .onnx_model import write_back

log = logging.getLogger(__name__)


def _load(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    p = Path(path)
    if not p.is_file():
        raise InvalidDataError(f"{p}: safetensors file not found")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several error types for corrupt headers
        raise InvalidDataError(f"{p}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc


def match_safetensors(model: onnx.ModelProto, tensors: dict[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
    """Map checkpoint tensors to initializer arrays (in ONNX layout and dtype)."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {name: tuple(t.dims) for name, t in inits.items() if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)}
    taken: set[str] = set()
    out: dict[str, np.ndarray] = {}
    pending = []
    for key, arr in tensors.items():
        if key in inits:
            if tuple(arr.shape) != tuple(inits[key].dims):
                raise InvalidDataError(f"{source}: tensor '{key}' has shape {tuple(arr.shape)}, the model's initializer has {tuple(inits[key].dims)}")
            out[key] = arr
            taken.add(key)
        else:
            pending.append(key)
    for key in pending:
        arr = tensors[key]
        same = [n for n, s in shapes.items() if n not in taken and s == tuple(arr.shape)]
        if len(same) == 1:
            out[same[0]], _ = arr, taken.add(same[0])
            continue
        transposed = [n for n, s in shapes.items() if n not in taken and arr.ndim == 2 and s == tuple(arr.shape[::-1])]
        if not same and len(transposed) == 1:
            out[transposed[0]] = np.ascontiguousarray(arr.T)
            taken.add(transposed[0])
            continue
        reason = "several initializers have that shape" if len(same) > 1 or len(transposed) > 1 else "no initializer has that shape"
        raise InvalidDataError(f"{source}: cannot match tensor '{key}' {tuple(arr.shape)} to an initializer ({reason})")
    for name, arr in out.items():
        dtype = numpy_helper.to_array(inits[name]).dtype if inits[name].data_type != onnx.TensorProto.BFLOAT16 else np.float32
        if not np.all(np.isfinite(arr)):
            raise InvalidDataError(f"{source}: tensor for initializer '{name}' holds NaN or Inf")
        out[name] = arr.astype(dtype, copy=False)
    return out


def apply_safetensors(model: onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers replaced by the matching checkpoint tensors."""
    tensors = _load(path)
    if not tensors:
        raise InvalidDataError(f"{path}: the safetensors file holds no tensors")
    arrays = match_safetensors(model, tensors, str(path))
    log.info("replaced %d initializers from %s", len(arrays), path)
    return write_back(model, arrays)
