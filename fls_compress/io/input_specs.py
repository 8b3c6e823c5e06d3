"""What a graph's inputs expect, read from the ONNX graph alone.

* :func:`graph_input_specs` - name, numpy dtype, shape and batch axis of every real graph input. A
  dimension is static only when ``dim_value > 0``; ``dim_param`` names, missing values and the
  ``-1`` / ``0`` that some exporters (paddle2onnx) write for "any size" are all dynamic (``None`` or
  the name). The batch axis is 0 except for state-like inputs (see :func:`_with_batch_axes`).
* :func:`embedding_ranges` - for integer inputs read directly by ``Gather`` from a constant table
  (token ids into an embedding), the number of rows of that table: the ids must lie in
  ``[-rows, rows)`` (ONNX Gather-13 semantics), anything else would be an out-of-bounds read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from fls_compress.errors import InvalidDataError

Dim = int | str | None
"""A graph dimension: a static size, a symbolic name (``dim_param``) or ``None`` (unknown)."""


@dataclass(frozen=True)
class InputSpec:
    """What one graph input expects: name, numpy dtype and shape (``None`` when the rank is unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    batch_axis: int = 0

    @property
    def one_sample_at_a_time(self) -> bool:
        """``True`` when the batch dimension is a static 1 (the model takes one sample per call)."""
        return bool(self.shape) and self.shape[self.batch_axis] == 1

    @property
    def is_scalar(self) -> bool:
        """``True`` for a rank-0 input (one value shared by every sample, e.g. a sample rate)."""
        return self.shape is not None and len(self.shape) == 0

    def describe_shape(self) -> str:
        """The expected shape as users read it, e.g. ``(N, 784)``; dynamic dims by name or ``?``."""
        if self.shape is None:
            return "(any shape)"
        parts = [str(d) if d is not None else "?" for d in self.shape]
        return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _dim(dim: onnx.TensorShapeProto.Dimension) -> Dim:
    if dim.HasField("dim_value"):
        return int(dim.dim_value) if dim.dim_value > 0 else None
    if dim.HasField("dim_param") and dim.dim_param not in ("", "?", "-1"):
        return dim.dim_param
    return None


def graph_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of ``model``'s graph (``graph.input`` minus initializers), in graph order.

    Raises :class:`InvalidDataError` for inputs that cannot be fed from numpy arrays (non-tensor or
    string inputs).
    """
    graph = model.graph
    constant = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    specs = []
    for value_info in graph.input:
        if value_info.name in constant:
            continue
        if value_info.type.WhichOneof("value") != "tensor_type":
            raise InvalidDataError(f"model input '{value_info.name}' is not a tensor; it cannot be fed from arrays")
        tensor_type = value_info.type.tensor_type
        if tensor_type.elem_type == onnx.TensorProto.STRING:
            raise InvalidDataError(f"model input '{value_info.name}' holds strings; string inputs are not supported")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape: tuple[Dim, ...] | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value_info.name, dtype, shape))
    return _with_batch_axes(specs)


def _with_batch_axes(specs: list[InputSpec]) -> list[InputSpec]:
    """Find the batch axis of state-like inputs whose leading dimension is a static size.

    Recurrent state is often declared ``[layers, batch, hidden]`` (e.g. ``[2, batch, 128]``) next to
    data inputs ``[batch, ...]``. For an input with a static leading size other than 1, the batch
    axis is the later axis named like another input's leading dimension (same ``dim_param``), or,
    failing that, its only dynamic axis when some other input has a dynamic leading dimension.
    Otherwise it stays 0 (the static leading size is then the number of samples per call).
    """
    leading = {spec.shape[0] for spec in specs if spec.shape and not isinstance(spec.shape[0], int)}
    result = []
    for spec in specs:
        axis = 0
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] != 1 and leading:
            named = [a for a, d in enumerate(spec.shape) if a > 0 and isinstance(d, str) and d in leading]
            dynamic = [a for a, d in enumerate(spec.shape) if a > 0 and not isinstance(d, int)]
            if named:
                axis = named[0]
            elif len(dynamic) == 1:
                axis = dynamic[0]
        result.append(InputSpec(spec.name, spec.dtype, spec.shape, axis) if axis else spec)
    return result


def output_classes(model: onnx.ModelProto) -> int | None:
    """Number of classes of a classifier-shaped first output ``[N, C]`` with static ``C > 1``, else ``None``."""
    if not model.graph.output:
        return None
    tensor_type = model.graph.output[0].type.tensor_type
    if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) != 2:
        return None
    last = tensor_type.shape.dim[1]
    if last.HasField("dim_value") and last.dim_value > 1:
        return int(last.dim_value)
    return None


def embedding_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input name -> rows of the constant table a ``Gather`` reads with it as indices.

    Only inputs used directly as ``Gather`` indices into an initializer or ``Constant`` table are
    listed; an input indexing several tables gets the smallest row count along the gathered axis.
    """
    graph = model.graph
    tables = {t.name: [int(d) for d in t.dims] for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = [int(d) for d in attr.t.dims]
    inputs = {vi.name for vi in graph.input} - set(tables)
    ranges: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        table, indices = node.input[0], node.input[1]
        if indices not in inputs or table not in tables or not tables[table]:
            continue
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        dims = tables[table]
        rows = dims[axis % len(dims)]
        ranges[indices] = min(rows, ranges.get(indices, rows))
    return ranges
