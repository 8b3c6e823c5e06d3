"""Structural groups of an ONNX graph: channels / neurons that can be removed by shrinking tensors.

A *group* is one producer layer's output dimension, the Conv's output channels or a Gemm/MatMul's
output features ("neurons"), together with everything that is indexed by it on the way to the layers
that read it:

* the producer's weight rows (Conv axis 0, Gemm ``B`` axis 0 or 1 by ``transB``, MatMul ``X @ W`` axis 1)
  and its bias (Conv input 2, Gemm ``C``);
* per-channel vectors of the nodes the activation passes through: BatchNormalization's scale, bias,
  mean and variance, constants of element-wise Add/Sub/Mul/Div/PRelu/Max/Min whose broadcast shape has
  the channel dimension (a MatMul's bias Add);
* nodes that pass channels through unchanged: element-wise activations, pooling, Dropout, Identity, Cast,
  and ``Flatten`` (or a ``Reshape`` to ``[0, -1]``) after which each channel is a block of ``H*W``
  consecutive features;
* the *consumers*: Conv (``group == 1``) input channels, Gemm/MatMul input features (in blocks of
  ``H*W`` after a Flatten), whose weights lose those input columns.

Removing channel ``j`` of the producer is then exactly the same function as zeroing the consumers'
input columns of ``j`` (what the selection in :mod:`fls_compress.structured.selection` evaluates).
Everything that would need more than that (two branches meeting in Add/Concat, i.e. residual-coupled
channels; Reshape/Split constants that hold the channel count; graph outputs whose shape would change;
grouped convolutions; weights or vectors shared between nodes; Constant-node weights) makes the group a
:class:`Skipped` one, with the reason, and the graph keeps it whole.

This is the dependency-graph view of structured pruning (as in Fang et al. 2023, "DepGraph"), restricted
to the patterns that can be rewritten safely without re-exporting the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ..io.onnx_model import STORAGE_INITIALIZER, prunable_initializers

KINDS = {"channels": ("Conv",), "neurons": ("Gemm", "MatMul")}

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish",
    "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Cast", "ThresholdedRelu", "Mish",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Pow"}


@dataclass(frozen=True)
class Slice:
    """An initializer indexed by the group's channels along ``axis``, ``block`` entries per channel."""

    name: str
    axis: int
    block: int = 1
    role: str = ""  # producer weight / producer bias / batchnorm / constant / consumer weight


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the group's channels as input columns of its (out, in) matrix view."""

    weight: str
    node: str
    op_type: str
    block: int  # matrix-view columns per channel: prod(kernel) for Conv, H*W after a Flatten, else 1
    bias: str | None  # its bias initializer (for the OBS bias compensation), if it has its own


@dataclass(frozen=True)
class Group:
    """One prunable structural group (see the module docstring)."""

    kind: str  # "channels" | "neurons"
    producer: str  # producer weight name
    node: str  # producer node label
    op_type: str
    size: int  # channels / neurons
    slices: tuple[Slice, ...]
    consumers: tuple[Consumer, ...]
    tensors: tuple[tuple[str, int, int], ...]  # activations whose dim shrinks: (name, axis (< 0), block)

    def indices(self, keep: np.ndarray, block: int) -> np.ndarray:
        """Positions along a ``block``-per-channel axis of the kept channels."""
        keep = np.asarray(keep, dtype=np.int64)
        return (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)


@dataclass(frozen=True)
class Skipped:
    producer: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"producer": self.producer, "node": self.node, "reason": self.reason}


@dataclass
class Analysis:
    groups: list[Group] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


class _Reject(Exception):
    """A reason the group cannot be rewritten."""


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.labels = [_label(n, i) for i, n in enumerate(self.nodes)]
        self.inits = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in dict.fromkeys(n.input):
                if v:
                    self.readers.setdefault(v, []).append(i)
        for sub in (n for n in self.nodes if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                 for a in n.attribute)):
            self._subgraph_reads(sub)

    def _subgraph_reads(self, node: onnx.NodeProto) -> None:
        """Values read inside If/Loop/Scan bodies count as read by that node (outer-scope references)."""
        idx = self.nodes.index(node)
        stack = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        stack += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
        while stack:
            body = stack.pop()
            for n in body.node:
                for v in n.input:
                    if v and idx not in self.readers.setdefault(v, []):
                        self.readers[v].append(idx)
                stack += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]

    def dims(self, name: str) -> list[int]:
        return [int(d) for d in self.inits[name].dims]

    def const_value(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return onnx.numpy_helper.to_array(self.inits[name])
        for n in self.nodes:
            if n.op_type == "Constant" and n.output and n.output[0] == name:
                for a in n.attribute:
                    if a.name == "value":
                        return onnx.numpy_helper.to_array(a.t)
                    if a.name == "value_ints":
                        return np.asarray(list(a.ints), dtype=np.int64)
        return None

    def own(self, name: str, index: int, what: str) -> None:
        """``name`` must be an initializer read by node ``index`` only (it will be rewritten)."""
        if name not in self.inits:
            raise _Reject(f"{what} '{name}' is not an initializer")
        if self.readers.get(name, []) != [index] or name in self.outputs:
            raise _Reject(f"{what} '{name}' is shared with other nodes")


def find_groups(model: onnx.ModelProto, kind: str) -> Analysis:
    """The groups of ``kind`` ("channels": Conv producers; "neurons": Gemm/MatMul producers), graph order."""
    graph = _Graph(model)
    out = Analysis()
    sites = {s.name: s for s in prunable_initializers(model)}
    producers = []
    for i, node in enumerate(graph.nodes):
        if node.op_type in KINDS[kind] and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            w = node.input[1] if node.op_type != "MatMul" or node.input[1] in graph.inits else node.input[0]
            if w in sites:
                producers.append((i, w))
    for i, w in producers:
        try:
            out.groups.append(_group(graph, sites, kind, i, w))
        except _Reject as exc:
            out.skipped.append(Skipped(w, graph.labels[i], str(exc)))
    return out


def _group(graph: _Graph, sites, kind: str, index: int, weight: str) -> Group:
    node = graph.nodes[index]
    site = sites[weight]
    if getattr(site, "storage", STORAGE_INITIALIZER) != STORAGE_INITIALIZER or weight not in graph.inits:
        raise _Reject("the weight is a Constant node, not an initializer")
    graph.own(weight, index, "weight")
    dims = graph.dims(weight)
    slices: list[Slice] = []
    if node.op_type == "Conv":
        if int(_attr(node, "group", 1)) != 1:
            raise _Reject("grouped / depthwise convolution (its input channels are tied to its output channels)")
        size, rank = dims[0], len(dims)
        slices.append(Slice(weight, 0, role="producer weight"))
        if len(node.input) > 2 and node.input[2]:
            graph.own(node.input[2], index, "bias")
            slices.append(Slice(node.input[2], 0, role="producer bias"))
    elif node.op_type == "Gemm":
        if len(dims) != 2:
            raise _Reject("Gemm weight is not 2-D")
        axis = 0 if int(_attr(node, "transB", 0)) else 1
        size, rank = dims[axis], 2
        slices.append(Slice(weight, axis, role="producer weight"))
        if len(node.input) > 2 and node.input[2]:
            slices += _vector(graph, index, node.input[2], -1, size, 2, "producer bias")
    else:  # MatMul
        if node.input[1] != weight or len(dims) != 2:
            raise _Reject("MatMul weight is not the 2-D right operand (X @ W)")
        size, rank = dims[1], None
        slices.append(Slice(weight, 1, role="producer weight"))
    if size < 2:
        raise _Reject(f"only {size} output {kind}")
    consumers: list[Consumer] = []
    tensors: list[tuple[str, int, int]] = []
    axis = -(rank - 1) if node.op_type == "Conv" else -1
    _walk(graph, sites, node.output[0], axis, rank, 1, size, slices, consumers, tensors, set())
    if not consumers:
        raise _Reject("no Conv/Gemm/MatMul reads the output")
    return Group(kind, weight, graph.labels[index], node.op_type, size, tuple(slices), tuple(consumers), tuple(tensors))


def _vector(graph: _Graph, index: int, name: str, axis: int, size: int, rank: int | None, role: str) -> list[Slice]:
    """A constant operand broadcast against the activation: [] if it does not depend on the channel
    (size 1 there, or absent), one :class:`Slice` if it has one entry per channel, else rejected."""
    if name not in graph.inits:
        raise _Reject(f"{role} '{name}' of node {graph.labels[index]} is not an initializer")
    dims = graph.dims(name)
    pos = len(dims) + axis  # axis < 0 counts from the end (numpy broadcasting aligns the right)
    if rank is not None and len(dims) > rank:
        raise _Reject(f"{role} '{name}' has more dimensions than the activation")
    if pos < 0 or dims[pos] == 1:
        return []
    if dims[pos] != size:
        raise _Reject(f"{role} '{name}' (shape {dims}) does not broadcast per channel")
    graph.own(name, index, role)
    return [Slice(name, pos, role=role)]


def _walk(graph: _Graph, sites, value: str, axis: int, rank: int | None, block: int, size: int,
          slices: list[Slice], consumers: list[Consumer], tensors: list, seen: set[str]) -> None:
    """Follow ``value`` (its channel axis ``axis`` < 0, ``block`` features per channel) to its consumers."""
    if value in seen:
        return
    seen.add(value)
    if value in graph.outputs:
        raise _Reject(f"'{value}' is a graph output (its shape must not change)")
    tensors.append((value, axis, block))
    readers = graph.readers.get(value, [])
    if not readers:
        raise _Reject(f"'{value}' is not read by any node")
    for i in readers:
        node = graph.nodes[i]
        label = f"{node.op_type} node {graph.labels[i]}"
        if node.domain not in ("", "ai.onnx"):
            raise _Reject(f"{label} ({node.domain}) reads the channels")
        op = node.op_type
        others = [v for v in node.input if v and v != value]
        extra_out = [o for o in node.output[1:] if o and (o in graph.readers or o in graph.outputs)]
        if op in ("Conv", "Gemm", "MatMul") and node.input[0] == value and len(node.input) > 1 and node.input[1] in sites:
            consumers.append(_consumer(graph, sites, i, axis, rank, block, size))
        elif op in UNARY or op == "Dropout" or (op == "Clip" and all(v in graph.inits or graph.const_value(v) is not None
                                                                         for v in others)):
            if op == "Clip" and any(np.asarray(graph.const_value(v)).size != 1 for v in others):
                raise _Reject(f"{label} has non-scalar bounds")
            if extra_out:
                raise _Reject(f"{label} has a second output in use")
            if op in ("Dropout",) and others and any(v not in graph.inits for v in others):
                raise _Reject(f"{label} has a non-constant ratio / training_mode")
            _walk(graph, sites, node.output[0], axis, rank, block, size, slices, consumers, tensors, seen)
        elif op in POOLS:
            if rank is None or axis != -(rank - 1) or node.input[0] != value:
                raise _Reject(f"{label} pools a tensor whose channel axis is not 1")
            if extra_out:
                raise _Reject(f"{label} has a second output (indices) in use")
            _walk(graph, sites, node.output[0], axis, rank, block, size, slices, consumers, tensors, seen)
        elif op == "BatchNormalization":
            if node.input[0] != value or rank is None or axis != -(rank - 1):
                raise _Reject(f"{label} normalises a tensor whose channel axis is not 1")
            if int(_attr(node, "training_mode", 0)) or extra_out:
                raise _Reject(f"{label} is in training mode")
            for role, name in zip(("batchnorm scale", "batchnorm bias", "batchnorm mean", "batchnorm var"), node.input[1:5]):
                graph.own(name, i, role)
                if graph.dims(name) != [size]:
                    raise _Reject(f"{role} '{name}' has shape {graph.dims(name)}, not [{size}]")
                slices.append(Slice(name, 0, role=role))
            _walk(graph, sites, node.output[0], axis, rank, block, size, slices, consumers, tensors, seen)
        elif op in BINARY:
            if any(v not in graph.inits for v in others):
                raise _Reject(f"{label} combines the channels with another activation "
                              "(residual-coupled or gated channels are left whole)")
            if op == "PRelu" and node.input[0] != value:
                raise _Reject(f"{label} reads the channels as its slope")
            for v in dict.fromkeys(others):
                slices += _vector(graph, i, v, axis, size, rank, "constant")
            _walk(graph, sites, node.output[0], axis, rank, block, size, slices, consumers, tensors, seen)
        elif op in ("Flatten", "Reshape") and node.input[0] == value:
            _flatten(graph, sites, i, axis, rank, block, size, slices, consumers, tensors, seen)
        elif op == "Concat":
            raise _Reject(f"{label} joins the channels with another tensor (channels coupled across branches)")
        elif op in ("Split", "Slice", "Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze"):
            raise _Reject(f"{label} indexes or reshapes the channels (rewriting its constants is not implemented)")
        else:
            raise _Reject(f"{label} reads the channels and is not known to pass them through")


def _flatten(graph: _Graph, sites, index: int, axis: int, rank: int | None, block: int, size: int,
             slices, consumers, tensors, seen) -> None:
    """Flatten(axis=1) or Reshape to [0 or N, -1] of an (N, C, ...) tensor: channel c becomes a block of
    prod(spatial) features (the block is read off the consumer: in_features / C)."""
    node = graph.nodes[index]
    label = f"{node.op_type} node {graph.labels[index]}"
    if rank is None or axis != -(rank - 1):
        raise _Reject(f"{label} flattens a tensor whose channel axis is not 1")
    if node.op_type == "Flatten":
        if int(_attr(node, "axis", 1)) not in (1, 1 - rank):
            raise _Reject(f"{label} does not flatten from axis 1")
    else:
        shape = graph.const_value(node.input[1])
        if shape is None or shape.shape != (2,) or int(shape[1]) != -1 or int(shape[0]) < 0 or int(_attr(node, "allowzero", 0)):
            raise _Reject(f"{label} has a shape constant other than [0, -1] / [N, -1] "
                          "(Reshape constants that hold the channel count are not rewritten)")
    if rank == 2:  # (N, C) -> (N, C): nothing moves
        _walk(graph, sites, node.output[0], -1, 2, block, size, slices, consumers, tensors, seen)
        return
    _walk(graph, sites, node.output[0], -1, 2, 0, size, slices, consumers, tensors, seen)  # block 0: not yet known


def _consumer(graph: _Graph, sites, index: int, axis: int, rank: int | None, block: int, size: int) -> Consumer:
    node = graph.nodes[index]
    label = f"{node.op_type} node {graph.labels[index]}"
    weight = node.input[1]
    if weight not in graph.inits:
        raise _Reject(f"weight of consumer {label} is not an initializer")
    graph.own(weight, index, f"weight of consumer {label}")
    dims = graph.dims(weight)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        if int(_attr(node, "group", 1)) != 1:
            raise _Reject(f"consumer {label} is a grouped / depthwise convolution")
        if rank is None or axis != -(rank - 1) or len(dims) != rank or dims[1] != size:
            raise _Reject(f"consumer {label} does not read the channels as its input channels")
        if bias is not None:
            graph.own(bias, index, f"bias of consumer {label}")
        return Consumer(weight, graph.labels[index], "Conv", int(math.prod(dims[2:])), bias)
    if axis != -1 or len(dims) != 2:
        raise _Reject(f"consumer {label} does not read the channels as its input features")
    if node.op_type == "Gemm":
        if int(_attr(node, "transA", 0)):
            raise _Reject(f"consumer {label} has transA=1")
        in_features = dims[1] if int(_attr(node, "transB", 0)) else dims[0]
        if bias is not None:
            bdims = graph.dims(bias) if bias in graph.inits else None
            if bdims is None or math.prod(bdims) != (dims[0] if int(_attr(node, "transB", 0)) else dims[1]) or len(bdims) != 1:
                bias = None  # broadcast / absent: no bias compensation, but the consumer is still fine
            else:
                try:
                    graph.own(bias, index, "bias")
                except _Reject:
                    bias = None
    else:
        in_features, bias = dims[0], None
    if block == 0:
        if in_features % size:
            raise _Reject(f"consumer {label} has {in_features} input features, not a multiple of {size} channels")
        block = in_features // size
    if in_features != size * block:
        raise _Reject(f"consumer {label} has {in_features} input features, not {size} x {block}")
    return Consumer(weight, graph.labels[index], node.op_type, block, bias)


def consumer_slice(graph_model: onnx.ModelProto, consumer: Consumer) -> Slice:
    """The axis of the consumer's ONNX weight that holds its input channels (``block`` per channel)."""
    node = next(n for i, n in enumerate(graph_model.graph.node) if _label(n, i) == consumer.node)
    if consumer.op_type == "Conv":
        return Slice(consumer.weight, 1, 1, "consumer weight")
    if consumer.op_type == "Gemm":
        return Slice(consumer.weight, 1 if int(_attr(node, "transB", 0)) else 0, consumer.block, "consumer weight")
    return Slice(consumer.weight, 0, consumer.block, "consumer weight")
