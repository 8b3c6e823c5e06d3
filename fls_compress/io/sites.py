"""Which tensors of an ONNX graph are prunable weights (:func:`prunable_sites`).

A weight is a float tensor stored in the graph - an initializer, or the ``value`` of a ``Constant``
node (paddle2onnx and the TorchScript exporter store weights that way) - read as the kernel of a
Conv, the B of a Gemm, the constant operand of a MatMul, or (on request) the W / R of an LSTM / GRU,
directly or through ``Identity`` nodes. Every such tensor is described by one :class:`PrunableSite`,
the single representation the rest of the tool uses (bridge, write-back, reports). Weights that live
inside ``If`` / ``Loop`` / ``Scan`` bodies are found on request (``include_subgraphs``); their site
carries the body's path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from fls_compress.errors import InvalidOptionError

#: Operators whose weight initializers can be pruned by every method (the default).
SUPPORTED_PRUNABLE_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")

#: Recurrent operators whose W (input 1) and R (input 2) can be pruned through the torch bridge.
RECURRENT_OPS: tuple[str, ...] = ("LSTM", "GRU")

#: Every operator :func:`prunable_sites` can be asked about.
ALL_PRUNABLE_OPS: tuple[str, ...] = SUPPORTED_PRUNABLE_OPS + RECURRENT_OPS

#: Float element types a prunable weight may have (integer / quantized tensors are never pruned).
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})

#: Where a prunable weight is stored in its graph.
STORAGE_INITIALIZER = "initializer"
STORAGE_CONSTANT = "constant"


@dataclass(frozen=True)
class PrunableSite:
    """One prunable weight tensor.

    ``name`` is the value name the consumers read (the initializer name, or the output name of the
    ``Constant`` node); ``storage`` says which: ``"initializer"`` or ``"constant"``, and for
    constants ``constant_node`` is the producing node's label. ``input_index`` is the position at
    which the first prunable consumer reads the weight (1 for Conv/Gemm/LSTM W; 2 for LSTM R; 0 or 1
    for MatMul, i.e. ``W @ X`` or ``X @ W``); ``node_names`` lists every prunable consumer (unnamed
    nodes are called ``<op_type>_<index in its graph>``). ``dtype`` is the numpy name of the element
    type. ``subgraph`` is ``None`` for the top-level graph, else the path of the body holding the
    tensor, e.g. ``"If_3/then_branch"``.
    """

    name: str
    op_type: str
    node_names: tuple[str, ...]
    shape: tuple[int, ...]
    input_index: int
    storage: str = STORAGE_INITIALIZER
    constant_node: str | None = None
    dtype: str = "float32"
    subgraph: str | None = None


def identity_sources(graph: onnx.GraphProto, initializer_names: set[str]) -> dict[str, str]:
    """Map each output of an ``Identity`` chain rooted at one of ``initializer_names`` to that root."""
    sources: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input:
            src = sources.get(node.input[0], node.input[0])
            if src in initializer_names:
                sources[node.output[0]] = src
    return sources


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def constant_tensors(graph: onnx.GraphProto) -> dict[str, tuple[int, TensorProto]]:
    """``Constant`` nodes of ``graph`` (not its bodies) holding a tensor ``value``: output name ->
    (node index, tensor). The tensor is the node's attribute itself (not a copy); its ``name`` field
    is whatever the exporter wrote (often empty) - the value is addressed by the node's output name.
    """
    found: dict[str, tuple[int, TensorProto]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                found[node.output[0]] = (index, attr.t)
    return found


def all_graphs(graph: onnx.GraphProto, path: str | None = None) -> Iterator[tuple[str | None, onnx.GraphProto]]:
    """``(path, graph)`` for ``graph`` (path ``None``) and every body nested in it, depth first."""
    yield path, graph
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for k, body in enumerate(bodies):
                suffix = attr.name if attr.type == onnx.AttributeProto.GRAPH else f"{attr.name}[{k}]"
                label = f"{node_label(node, index)}/{suffix}"
                yield from all_graphs(body, label if path is None else f"{path}/{label}")


def _sites_of_graph(graph: onnx.GraphProto, ops: tuple[str, ...], path: str | None) -> list[PrunableSite]:
    """Sites whose tensor is stored in ``graph`` itself (outer-scope tensors are not followed)."""
    tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    constants = constant_tensors(graph)
    for name, (_, tensor) in constants.items():
        tensors.setdefault(name, tensor)
    sources = identity_sources(graph, set(tensors))

    def resolve(value: str) -> str:
        return sources.get(value, value)

    def float_tensor(value: str, rank: int | None = None) -> str | None:
        root = resolve(value)
        tensor = tensors.get(root)
        if tensor is None or tensor.data_type not in FLOAT_TYPES:
            return None
        if rank is not None and len(tensor.dims) != rank:
            return None
        return root

    found: dict[str, tuple[str, list[str], int]] = {}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        hits: list[tuple[str | None, int]] = []
        if node.op_type == "Conv" and len(node.input) > 1:
            hits.append((float_tensor(node.input[1]), 1))
        elif node.op_type == "Gemm" and len(node.input) > 1:
            hits.append((float_tensor(node.input[1], rank=2), 1))
        elif node.op_type == "MatMul" and len(node.input) == 2:
            left, right = float_tensor(node.input[0], rank=2), float_tensor(node.input[1], rank=2)
            left_const = resolve(node.input[0]) in tensors
            right_const = resolve(node.input[1]) in tensors
            if right is not None and not left_const:
                hits.append((right, 1))
            elif left is not None and not right_const:
                hits.append((left, 0))
        elif node.op_type in RECURRENT_OPS and len(node.input) > 2:
            hits.extend((float_tensor(node.input[i], rank=3), i) for i in (1, 2))
        for root, position in hits:
            if root is None:
                continue
            entry = found.setdefault(root, (node.op_type, [], position))
            entry[1].append(node_label(node, index))
    sites = []
    inits = {t.name for t in graph.initializer}
    for name, (op, nodes, pos) in found.items():
        tensor = tensors[name]
        storage = STORAGE_INITIALIZER if name in inits else STORAGE_CONSTANT
        producer = None
        if storage == STORAGE_CONSTANT:
            node_index = constants[name][0]
            producer = node_label(graph.node[node_index], node_index)
        sites.append(
            PrunableSite(
                name=name,
                op_type=op,
                node_names=tuple(nodes),
                shape=tuple(int(d) for d in tensor.dims),
                input_index=pos,
                storage=storage,
                constant_node=producer,
                dtype=np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).name,
                subgraph=path,
            )
        )
    return sites


def prunable_sites(
    model: onnx.ModelProto,
    ops: tuple[str, ...] | list[str] = SUPPORTED_PRUNABLE_OPS,
    *,
    include_subgraphs: bool = False,
) -> list[PrunableSite]:
    """The float weights consumed by the given ops, in graph order.

    * Conv: input 1 (the kernel);
    * Gemm: input 1 (B) when it is a rank-2 constant tensor;
    * MatMul: a rank-2 constant tensor at input 1 (``X @ W``) or input 0 (``W @ X``) whose other
      operand is an activation (two constant operands are a constant-folding leftover, not a layer);
    * LSTM / GRU (only when asked for, see :data:`RECURRENT_OPS`): W (input 1) and R (input 2).

    A constant tensor is an initializer or the ``value`` of a ``Constant`` node, read directly or
    through a chain of ``Identity`` nodes (reported under the root's own name). Biases, norms and
    integer/quantized tensors are never returned. Only the top-level graph is searched unless
    ``include_subgraphs``; a body tensor whose name is also used by another graph is skipped (names
    must identify weights).
    """
    unknown = sorted(set(ops) - set(ALL_PRUNABLE_OPS))
    if unknown:
        raise InvalidOptionError(
            f"cannot prune operator(s) {', '.join(unknown)}; supported: {', '.join(ALL_PRUNABLE_OPS)}"
        )
    ops = tuple(ops)
    sites = _sites_of_graph(model.graph, ops, None)
    if not include_subgraphs:
        return sites
    seen: dict[str, int] = {}
    for _, graph in all_graphs(model.graph):
        names = {t.name for t in graph.initializer} | set(constant_tensors(graph))
        for name in names:
            seen[name] = seen.get(name, 0) + 1
    for path, graph in all_graphs(model.graph):
        if path is not None:
            sites.extend(s for s in _sites_of_graph(graph, ops, path) if seen.get(s.name) == 1)
    return sites


#: Former name of :func:`prunable_sites` (it also returns ``Constant``-node weights).
prunable_initializers = prunable_sites
