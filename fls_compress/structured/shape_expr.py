"""Symbolic values of the small integer computations exporters build target shapes with.

``x.view(x.size(0), -1)`` with a dynamic batch exports (torch's TorchScript exporter) as
``Shape(x) -> Gather(0) -> Unsqueeze -> Concat([.], [-1]) -> Reshape``; paddle2onnx writes
``Shape -> Cast -> Slice(0:1) -> Cast -> Concat -> Reshape``. :func:`shape_expr` evaluates such a 1-D
integer tensor to a list whose entries are integers or :data:`Dim` references ``(tensor, axis)``: "this
tensor's size along that axis at run time". With it the structured walk can tell that a Shape node reads
only the batch size (the channel count may change under it) and that a Reshape's computed target is
``[N, -1]`` (a flatten), instead of refusing every Shape node. This is static, from the graph alone (the
channel analysis runs before any data); :mod:`fls_compress.structured.shapes` instead re-evaluates shape
arithmetic on probed values, for attention heads.
"""

from __future__ import annotations

import numpy as np

from .nodes import attr
from .types import Reject

Dim = tuple[str, int]  # (tensor, axis): that tensor's size along ``axis``
Entry = int | Dim

#: nodes that hand a 1-D shape vector on unchanged (Unsqueeze/Squeeze of a scalar / one-element vector)
PASS = {"Cast", "Identity", "Unsqueeze", "Squeeze"}
#: nodes a shape vector flows through inside the computation (the rest only read it)
FLOW = PASS | {"Gather", "Slice", "Concat"}
MAX_DEPTH = 32


def shape_expr(graph, name: str, depth: int = 0) -> list[Entry] | None:
    """The entries of the 0-D / 1-D integer tensor ``name`` (``graph``: a
    :class:`~fls_compress.structured.walk.GraphIndex`), or None where the computation is not one of
    Shape / constant / Cast / Identity / Unsqueeze / Squeeze / Gather / Slice / Concat on axis 0."""
    const = graph.const_value(name)
    if const is not None:
        arr = np.asarray(const)
        if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
            return None
        return [int(v) for v in arr.reshape(-1)]
    i = graph.producer.get(name)
    if i is None or depth > MAX_DEPTH:
        return None
    node = graph.nodes[i]
    if node.domain not in ("", "ai.onnx"):
        return None
    op, ins = node.op_type, list(node.input)
    if op == "Shape":
        dims = graph.shape(ins[0])
        if dims is None:
            return None
        rank = len(dims)
        start, end = (int(attr(node, "start", 0)), int(attr(node, "end", rank)))
        start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
        return [(ins[0], k) for k in range(start, end)]
    if op in PASS:
        return shape_expr(graph, ins[0], depth + 1)
    if op == "Concat":
        if int(attr(node, "axis", 0)) not in (0, -1):
            return None
        parts = [shape_expr(graph, v, depth + 1) for v in ins]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    data = shape_expr(graph, ins[0], depth + 1) if ins else None
    if data is None:
        return None
    if op == "Gather":
        idx = graph.const_value(ins[1]) if len(ins) > 1 else None
        if idx is None or int(attr(node, "axis", 0)) != 0:
            return None
        picks = [int(k) for k in np.asarray(idx).reshape(-1)]
        return [data[k] for k in picks] if all(-len(data) <= k < len(data) for k in picks) else None
    if op == "Slice":
        return _slice(graph, node, data)
    return None


def _slice(graph, node, data: list[Entry]) -> list[Entry] | None:
    if len(node.input) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        vals = [graph.const_value(v) if v else None for v in list(node.input[1:5]) + [""] * (4 - len(node.input[1:5]))]
        if vals[0] is None or vals[1] is None or any(v is None for v, n in zip(vals[2:], node.input[3:5]) if n):
            return None
        starts, ends, axes, steps = (None if v is None else [int(x) for x in np.asarray(v).reshape(-1)] for v in vals)
    else:
        starts, ends, axes, steps = attr(node, "starts", None), attr(node, "ends", None), attr(node, "axes", None), None
        if starts is None or ends is None:
            return None
    if len(starts) != 1 or (axes is not None and list(axes) not in ([0], [-1])):
        return None
    step = steps[0] if steps else 1
    return data[slice(int(starts[0]), int(ends[0]), step)] if step else None


def const_source(graph, name: str, index: int) -> tuple[str, int] | None:
    """(constant, position) that entry ``index`` of the shape vector ``name`` is copied from, through
    Cast / Identity / Unsqueeze / Squeeze / Concat, when every tensor on the way has this one reader (so
    that rewriting the constant changes nothing else); None otherwise."""
    if len(graph.readers.get(name, [])) != 1 or name in graph.outputs:
        return None
    if name in graph.inits or name in graph.constants:
        value = graph.const_value(name)
        return (name, index) if value is not None and np.asarray(value).ndim <= 1 else None
    i = graph.producer.get(name)
    node = graph.nodes[i] if i is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in PASS:
        return const_source(graph, node.input[0], index)
    if node.op_type == "Concat":
        for v in node.input:
            part = shape_expr(graph, v)
            if part is None:
                return None
            if index < len(part):
                return const_source(graph, v, index)
            index -= len(part)
    return None


def reads_only_other_dims(graph, shape_node: int, value: str, channel: int) -> None:
    """Raise :class:`Reject` unless every tensor that leaves the shape computation of Shape node
    ``shape_node`` (the nodes of :data:`FLOW` from its output on; left when a node of another kind or the
    graph output reads it) is free of ``value``'s size along axis ``channel``: then the Shape node (a
    batch-size read, say) computes the same whatever channels are removed."""
    where = f"Shape node {graph.labels[shape_node]}"
    todo, seen = [graph.nodes[shape_node].output[0]], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        expr = shape_expr(graph, t)
        if expr is None:
            raise Reject(f"{where} feeds a shape computation that is not followed ('{t}')")
        flow = [r for r in graph.readers.get(t, [])
                if graph.nodes[r].op_type in FLOW and graph.nodes[r].domain in ("", "ai.onnx")]
        read_as_is = t in graph.outputs or len(flow) < len(graph.readers.get(t, []))
        if read_as_is and (value, channel) in expr:  # a Reshape, Expand, ... or the graph output takes it
            raise Reject(f"{where} reads the channel count of '{value}' (rewriting it is not implemented)")
        todo += [graph.nodes[r].output[0] for r in flow]
