"""Semantics-preserving graph clean-ups that let onnx2torch convert real-world exports.

onnx2torch reads Conv/Gemm/BN weights only from ``graph.initializer``, cannot read sparse
initializers, has no ``auto_pad=SAME_*`` support and treats an empty optional input as a dynamic
value. Each pass below rewrites one of these patterns into an equivalent form. The passes only ever
run on a *copy* used for conversion; the original model, into which pruned weights are written back,
is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fls_compress.io.onnx_model import densify_sparse_initializers

_LOG = logging.getLogger(__name__)

_SCALAR_CONSTANT_ATTRS: dict[str, type] = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}

_SAME_PAD_OPS = frozenset({"Conv", "MaxPool", "AveragePool"})


def _is_onnx_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _copy_and_apply(model: onnx.ModelProto, rewrite: Callable[[onnx.GraphProto], int]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rewrite(copy.graph)
    return copy


def _iter_graph_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_graph_nodes(sub)


# ------------------------------------------------------------------------------------------------
def move_constants_to_initializers(graph: onnx.GraphProto,
                                   select: Callable[[onnx.TensorProto], bool] | None = None) -> list[str]:
    """Move ``graph``'s top-level ``Constant`` nodes (tensor/float/int values) to initializers of the same
    name, in place; with ``select``, only the tensors it accepts. Constants that are graph outputs, or whose
    name already is an initializer, stay. Returns the moved names."""
    graph_outputs = {vi.name for vi in graph.output}
    existing = {t.name for t in graph.initializer}
    keep: list[onnx.NodeProto] = []
    moved: list[str] = []
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and _is_onnx_domain(node) and len(node.attribute) == 1:
            out = node.output[0]
            attr = node.attribute[0]
            if out not in graph_outputs and out not in existing:
                if attr.name == "value":
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = out
                elif attr.name in _SCALAR_CONSTANT_ATTRS:
                    value = helper.get_attribute_value(attr)
                    tensor = numpy_helper.from_array(np.asarray(value, dtype=_SCALAR_CONSTANT_ATTRS[attr.name]), out)
        if tensor is None or (select is not None and not select(tensor)):
            keep.append(node)
            continue
        graph.initializer.append(tensor)
        existing.add(tensor.name)
        moved.append(tensor.name)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with top-level ``Constant`` nodes (tensor/float/int values) as initializers.

    Constants that are graph outputs, or whose name already is an initializer, are left alone.
    """
    return _copy_and_apply(model, lambda graph: len(move_constants_to_initializers(graph)))


# ------------------------------------------------------------------------------------------------
def _fold_identity_of_initializers(graph: onnx.GraphProto) -> int:
    inits = {t.name for t in graph.initializer}
    graph_outputs = {vi.name for vi in graph.output}
    alias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and _is_onnx_domain(node) and node.input:
            src = alias.get(node.input[0], node.input[0])
            if src in inits:
                alias[node.output[0]] = src
    if not alias:
        return 0
    for node in _iter_graph_nodes(graph):
        for i, value in enumerate(node.input):
            if value in alias:
                node.input[i] = alias[value]
    keep = [
        node
        for node in graph.node
        if not (node.op_type == "Identity" and node.output and node.output[0] in alias)
        or node.output[0] in graph_outputs
    ]
    folded = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def fold_identity_of_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` where consumers of ``Identity(initializer)`` read the initializer directly.

    The Identity nodes are removed, except those producing a graph output.
    """
    return _copy_and_apply(model, _fold_identity_of_initializers)


# ------------------------------------------------------------------------------------------------
def _kernel_shape(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return list(attr.ints)
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
        return [int(d) for d in inits[node.input[1]].dims[2:]]
    return None


def _explicit_same_pads(graph: onnx.GraphProto) -> int:
    inits = {t.name: t for t in graph.initializer}
    rewritten = 0
    for node in graph.node:
        if node.op_type not in _SAME_PAD_OPS or not _is_onnx_domain(node):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        kernel = _kernel_shape(node, inits)
        if kernel is None:
            continue
        strides = list(attrs["strides"].ints) if "strides" in attrs else []
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else []
        if any(s != 1 for s in strides) or any(d != 1 for d in dilations):
            continue  # strided SAME depends on the input size; onnxruntime rejects dilated SAME
        totals = [k - 1 for k in kernel]
        if mode == "SAME_UPPER":
            begins = [t // 2 for t in totals]
        else:
            begins = [t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
        node.attribute.remove(attrs["auto_pad"])
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(helper.make_attribute("pads", begins + ends))
        rewritten += 1
    return rewritten


def explicit_same_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` where stride-1 ``auto_pad=SAME_UPPER/SAME_LOWER`` becomes explicit ``pads``.

    Total padding per axis is ``kernel - 1``; the odd extra element goes at the end for SAME_UPPER
    and at the beginning for SAME_LOWER. Strided SAME (padding depends on the input size) and dilated
    SAME (which onnxruntime, the verification reference, refuses to run) are left alone.
    """
    return _copy_and_apply(model, _explicit_same_pads)


# ------------------------------------------------------------------------------------------------
def _strip_trailing_empty_inputs(graph: onnx.GraphProto) -> int:
    stripped = 0
    for node in graph.node:
        while len(node.input) and node.input[-1] == "":
            node.input.pop()
            stripped += 1
    return stripped


def strip_trailing_empty_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` without trailing ``''`` (omitted optional) node inputs, e.g. ``Clip(x, m, '')``."""
    return _copy_and_apply(model, _strip_trailing_empty_inputs)


# ------------------------------------------------------------------------------------------------
def _drop_redundant_allowzero(graph: onnx.GraphProto) -> int:
    inits = {t.name: t for t in graph.initializer}
    dropped = 0
    for node in graph.node:
        if node.op_type != "Reshape" or not _is_onnx_domain(node) or len(node.input) < 2:
            continue
        allowzero = next((a for a in node.attribute if a.name == "allowzero"), None)
        shape = inits.get(node.input[1])
        if allowzero is None or allowzero.i != 1 or shape is None:
            continue
        if np.all(numpy_helper.to_array(shape) != 0):
            node.attribute.remove(allowzero)
            dropped += 1
    return dropped


def drop_redundant_allowzero(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` without ``allowzero=1`` on Reshapes whose constant shape holds no 0.

    ``allowzero`` only changes what a 0 in ``shape`` means, so without zeros it is a no-op; onnx2torch
    refuses the attribute (Reshape-14, as written by exporters at opset 18).
    """
    return _copy_and_apply(model, _drop_redundant_allowzero)


# ------------------------------------------------------------------------------------------------
_WIDE_FLOATS = (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _tensor_to_float32(tensor: onnx.TensorProto) -> bool:
    if tensor.data_type not in _WIDE_FLOATS:
        return False
    arr = numpy_helper.to_array(tensor).astype(np.float32)
    replacement = numpy_helper.from_array(arr, tensor.name)
    tensor.CopyFrom(replacement)
    return True


def _value_info_to_float32(vi: onnx.ValueInfoProto) -> bool:
    if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _WIDE_FLOATS:
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        return True
    return False


def _graph_to_float32(graph: onnx.GraphProto) -> int:
    changed = sum(_tensor_to_float32(t) for t in graph.initializer)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        changed += _value_info_to_float32(vi)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                changed += _tensor_to_float32(attr.t)
            elif attr.type == onnx.AttributeProto.GRAPH:
                changed += _graph_to_float32(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                changed += sum(_graph_to_float32(g) for g in attr.graphs)
            elif attr.name == "to" and node.op_type == "Cast" and attr.i in _WIDE_FLOATS:
                attr.i = onnx.TensorProto.FLOAT
                changed += 1
    return changed


def to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Copy of ``model`` computing in float32: float16 / bfloat16 / float64 initializers, Constant
    values, Cast targets and declared input/output types become float32 (calibration only; the
    pruned weights are written back in the original dtype). Returns the copy and the number of
    rewritten items (0: the model already was float32)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, _graph_to_float32(copy.graph)


def bind_inputs(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``model`` where the named graph inputs become initializers holding ``values``
    (rank-0 inputs that take one value for the whole calibration set)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i in reversed(range(len(copy.graph.input))):
        name = copy.graph.input[i].name
        if name in values:
            del copy.graph.input[i]
            copy.graph.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    return copy


def _safe_node_names(graph: onnx.GraphProto) -> int:
    """Rename nodes whose names torch.fx cannot emit as attribute paths (backslashes, quotes, control
    characters become ``_``; a clash gets a numeric suffix). Only the copy handed to onnx2torch changes:
    write-back goes by initializer name, never by node name."""
    taken = {node.name for node in _iter_graph_nodes(graph)}
    renamed = 0
    for node in _iter_graph_nodes(graph):
        safe = "".join(c if c.isprintable() and c not in "\\'\"" else "_" for c in node.name)
        if safe == node.name:
            continue
        candidate, k = safe, 1
        while candidate in taken:
            candidate, k = f"{safe}_{k}", k + 1
        taken.add(candidate)
        node.name = candidate
        renamed += 1
    return renamed


# ------------------------------------------------------------------------------------------------
def prepare_for_torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with every clean-up applied, ready for ``onnx2torch.convert``."""
    prepared = densify_sparse_initializers(model)
    graph = prepared.graph
    counts = {
        "constants->initializers": len(move_constants_to_initializers(graph)),
        "identity folds": _fold_identity_of_initializers(graph),
        "allowzero dropped": _drop_redundant_allowzero(graph),
        "SAME pads": _explicit_same_pads(graph),
        "empty inputs": _strip_trailing_empty_inputs(graph),
        "node names made safe": _safe_node_names(graph),
    }
    _LOG.debug("prepared model for torch: %s", counts)
    return prepared
