"""Substitute weights from a safetensors checkpoint into an ONNX graph before compression.

Exported graphs rarely keep the state-dict names of large weights: the TorchScript and dynamo
exporters store ``nn.Linear`` weights as anonymous, transposed MatMul constants (``onnx::MatMul_15``,
``val_0``). Matching is therefore, for each checkpoint tensor:

1. by exact initializer name (shape must match);
2. otherwise by shape and by how the graph uses each candidate. A checkpoint matrix is a torch
   ``nn.Linear`` weight ``[out, in]``; the graph stores it as ``[in, out]`` when it is the right
   operand of ``MatMul`` (``X @ W``) or ``Gemm`` B with ``transB=0``, and as ``[out, in]`` when it is
   ``Gemm`` B with ``transB=1`` or the left operand of ``MatMul`` (``W @ X``). A candidate fits when
   its stored shape is the checkpoint shape in that orientation; the tensor is transposed exactly
   when the use says so. This is what makes a square ``Linear(d, d)`` load correctly: its shape alone
   cannot tell whether it is stored transposed.

Anything ambiguous (several fitting tensors, or a square matrix no MatMul/Gemm use orients) or
unmatched is an :class:`~fls_compress.errors.InvalidDataError` rather than a guess. Weights held by
``Constant`` nodes are candidates too. The ONNX model passed in is not
modified; a copy is returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidDataError
from .onnx_model import constant_tensors, identity_sources, write_back

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


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _orientations(model: onnx.ModelProto, names: set[str]) -> dict[str, bool | None]:
    """For each 2-D weight: ``True`` when the graph stores a Linear weight transposed (``[in, out]``),
    ``False`` when as ``[out, in]``, ``None`` when no MatMul/Gemm use says so or uses disagree."""
    graph = model.graph
    sources = identity_sources(graph, names)
    seen: dict[str, set[bool]] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        roots = [sources.get(v, v) for v in node.input]
        if node.op_type == "MatMul" and len(roots) == 2:
            if roots[1] in names and roots[0] not in names:
                seen.setdefault(roots[1], set()).add(True)
            elif roots[0] in names and roots[1] not in names:
                seen.setdefault(roots[0], set()).add(False)
        elif node.op_type == "Gemm" and len(roots) > 1 and roots[1] in names:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            seen.setdefault(roots[1], set()).add(trans_b == 0)
    return {name: (next(iter(flags)) if len(flags) == 1 else None) for name, flags in seen.items()}


def _fits(arr: np.ndarray, shape: tuple[int, ...], transposed: bool | None) -> bool | None:
    """Whether ``arr`` fits a tensor of ``shape``: ``False``/``True`` = as is/transposed, ``None`` = no fit.

    Raises ``LookupError`` for a square matrix whose orientation the graph does not fix."""
    if arr.ndim != 2:
        return False if shape == tuple(arr.shape) else None
    if transposed is None:
        if shape == tuple(arr.shape) and shape == tuple(arr.shape[::-1]):
            raise LookupError
        if shape == tuple(arr.shape):
            return False
        return True if shape == tuple(arr.shape[::-1]) else None
    want = tuple(arr.shape[::-1]) if transposed else tuple(arr.shape)
    return transposed if shape == want else None


def match_safetensors(model: onnx.ModelProto, tensors: dict[str, np.ndarray], source: str = "weights") -> dict[str, np.ndarray]:
    """Map checkpoint tensors to weight arrays (in ONNX layout and dtype), see the module docstring."""
    stored: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
    for name, (_, tensor) in constant_tensors(model.graph).items():
        stored.setdefault(name, tensor)
    shapes = {name: tuple(int(d) for d in t.dims) for name, t in stored.items() if t.data_type in _FLOAT_TYPES}
    orient = _orientations(model, set(shapes))
    taken: set[str] = set()
    out: dict[str, np.ndarray] = {}
    pending = []
    for key, arr in tensors.items():
        if key in stored:
            if tuple(arr.shape) != tuple(stored[key].dims):
                raise InvalidDataError(f"{source}: tensor '{key}' has shape {tuple(arr.shape)}, the model's initializer has {tuple(stored[key].dims)}")
            out[key] = arr
            taken.add(key)
        else:
            pending.append(key)
    for key in pending:
        arr = tensors[key]
        fits: list[tuple[str, bool]] = []
        ambiguous: list[str] = []
        for name, shape in shapes.items():
            if name in taken:
                continue
            try:
                how = _fits(arr, shape, orient.get(name))
            except LookupError:
                ambiguous.append(name)
                continue
            if how is not None:
                fits.append((name, how))
        if len(fits) == 1 and not ambiguous:
            name, transpose = fits[0]
            out[name] = np.ascontiguousarray(arr.T) if transpose else arr
            taken.add(name)
            continue
        if ambiguous and not fits and len(ambiguous) == 1:
            raise InvalidDataError(
                f"{source}: tensor '{key}' {tuple(arr.shape)} is square and initializer '{ambiguous[0]}' is used by no "
                "MatMul/Gemm that says whether it is stored transposed; name it after the initializer"
            )
        reason = "several initializers fit it" if len(fits) + len(ambiguous) > 1 else "no initializer has that shape"
        raise InvalidDataError(f"{source}: cannot match tensor '{key}' {tuple(arr.shape)} to an initializer ({reason})")
    for name, arr in out.items():
        dtype = np.float32 if stored[name].data_type == onnx.TensorProto.BFLOAT16 else numpy_helper.to_array(stored[name]).dtype
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
