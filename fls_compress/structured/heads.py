"""Multi-head self-attention blocks of an ONNX graph whose heads can be removed by shrinking tensors.

A block is found from its core, ``MatMul(Q, K^T) -> [scale, mask] -> Softmax -> MatMul(P, V)``: walking
back from the core's Q, K and V operands through layout nodes (Reshape, Transpose, Squeeze, Unsqueeze,
Gather, bias Add, scale Mul/Div) to the projections ``x @ Wq``, ``x @ Wk``, ``x @ Wv`` (one packed
``x @ W_qkv`` as torch's ``nn.MultiheadAttention`` exports it counts once) and forward from ``P V`` to the
output projection ``Wo``. With ``d`` the contraction size of ``Q K^T`` and ``E`` = Wo's input features, the
block has ``H = E / d`` heads and each projection's outputs are laid out ``(O, H, d)`` (``O = 1``, or 3 for
a packed projection).

That layout is then *proved* on the graph: starting from the projections' outputs, every node that reads a
head-carrying tensor must be one whose effect on the head axis is known, evaluated on the probed shapes
(:mod:`.shapes`): reshapes of all kinds (the head factor is followed by its stride in the flattened tensor,
so ``[S, B, 3E] -> [S, B, 3, E]``, ``[S, B, E] -> [S, B*H, d]`` and ``[B*H, S, d] -> [B, H, S, d]`` are all
understood), transposes, gathers on other axes, element-wise nodes with broadcast operands (a mask with size 1
on the head axis) or per-head constants (sliced), softmax over another axis, batched matmuls of two tensors
with the same head axis (Q K^T, P V), and finally the single consumer ``Wo``, which must read exactly
``H * d`` input features in blocks of ``d``. Anything else (a graph output, a node not in that list, heads
mixed with another tensor, fused ``Attention`` operators) leaves the block whole with the reason.

Removing head ``h`` is then the same function as zeroing Wo's input rows ``h*d .. h*d + d - 1``, which is
what the selection evaluates (Michel et al. 2019, "Are Sixteen Heads Really Better than One?", prune heads
the same way; ZipLM, Kurtic et al. 2023, compensates Wo with structured OBS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from ..io.onnx_model import prunable_initializers
from .shapes import Probe
from .types import Consumer, Reject, Skipped
from .walk import GraphIndex, attr

LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Flatten", "Cast", "Identity", "Dropout"}
ARITH = {"Add", "Sub", "Mul", "Div"}
FUSED = {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention", "DecoderMaskedMultiHeadAttention"}


@dataclass(frozen=True)
class HeadSlice:
    """An initializer whose ``axis`` is laid out (outer, H, inner): each head owns ``inner`` entries in each
    of the ``outer`` blocks."""

    name: str
    axis: int
    outer: int
    inner: int
    role: str


@dataclass
class HeadGroup:
    """One attention block: its heads, the initializers indexed by them, the Wo consumer, the Reshape nodes
    that carry the head axis and the head-carrying tensors with their annotations."""

    node: str  # the Softmax node's label
    heads: int
    head_dim: int
    producers: tuple[str, ...]
    slices: list[HeadSlice]
    consumer: Consumer
    reshapes: list[str] = field(default_factory=list)  # output names of Reshape nodes reading head tensors
    ann: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)  # tensor -> (axis, inner per probe)


def find_head_groups(model: onnx.ModelProto, probes: list[Probe]) -> tuple[list[HeadGroup], list[Skipped]]:
    """Attention blocks whose heads can be removed, and those left whole with the reason (graph order)."""
    graph = GraphIndex(model)
    sites = {s.name for s in prunable_initializers(model)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    groups: list[HeadGroup] = []
    skipped: list[Skipped] = []
    for i, node in enumerate(graph.nodes):
        if node.op_type in FUSED or (node.op_type == "Attention" and node.domain in ("", "ai.onnx")):
            skipped.append(Skipped(node.input[1] if len(node.input) > 1 else "", graph.labels[i],
                                   f"fused {node.domain or 'ai.onnx'}.{node.op_type} operator (its head count is an "
                                   "attribute of a kernel; rewriting fused attention is not implemented)"))
        elif node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            try:
                groups.append(_block(graph, sites, probes, i, opset))
            except Reject as exc:
                skipped.append(Skipped("", graph.labels[i], str(exc)))
    return groups, skipped


def _dims(probes: list[Probe], name: str) -> list[tuple[int, ...]]:
    try:
        return [p.dims[name] for p in probes]
    except KeyError:
        raise Reject(f"the shape of '{name}' is unknown (not computed by the probe run)") from None


def _back(graph: GraphIndex, probes: list[Probe], value: str, stop: set[str], producers: dict[str, int]) -> None:
    """Walk from ``value`` against the data flow to the projection(s) that compute it."""
    seen = set()
    while True:
        if value in seen:
            raise Reject(f"cycle at '{value}'")
        seen.add(value)
        idx = next((i for i, n in enumerate(graph.nodes) if value in n.output), None)
        if idx is None:
            raise Reject(f"'{value}' is a graph input or initializer, not a projection of the attention input")
        node = graph.nodes[idx]
        where = f"{node.op_type} node {graph.labels[idx]}"
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in stop:
            producers.setdefault(node.output[0], idx)
            return
        if node.op_type in LAYOUT:
            value = node.input[0]
        elif node.op_type in ARITH:
            cands = [v for v in node.input if v and v not in graph.inits and graph.const_value(v) is None]
            if not cands:
                raise Reject(f"{where} has only constant operands")
            value = max(cands, key=lambda v: math.prod(_dims(probes, v)[0]))
        else:
            raise Reject(f"{where} computes an attention operand and is not a projection or a layout node")


def _forward_consumer(graph: GraphIndex, value: str, sites: set[str]) -> tuple[int, int]:
    """(node index, input features) of the output projection read by the attention output ``value``."""
    while True:
        readers = [r for r in graph.readers.get(value, []) if graph.nodes[r].op_type != "Shape"]  # shapes: heads_plan
        if len(readers) != 1:
            raise Reject(f"the attention output '{value}' is read by {len(readers)} nodes (expected one path to Wo)")
        node = graph.nodes[readers[0]]
        if node.op_type in ("MatMul", "Gemm") and node.input[0] == value and node.input[1] in sites \
                and node.input[1] in graph.inits:
            dims = graph.dims(node.input[1])
            trans = node.op_type == "Gemm" and int(attr(node, "transB", 0))
            if len(dims) != 2:
                raise Reject(f"output projection {graph.labels[readers[0]]} has a {len(dims)}-D weight")
            return readers[0], dims[1] if trans else dims[0]
        if node.op_type not in LAYOUT or node.input[0] != value:
            raise Reject(f"{node.op_type} node {graph.labels[readers[0]]} reads the attention output before any "
                         "output projection")
        value = node.output[0]


def _core(graph: GraphIndex, probes: list[Probe], i: int) -> tuple[int, int]:
    """(Q K^T MatMul, P V MatMul) around Softmax ``i``."""
    node = graph.nodes[i]
    value = node.input[0]
    while True:
        idx = next((j for j, n in enumerate(graph.nodes) if value in n.output), None)
        if idx is None:
            raise Reject("the softmax input is not computed by a MatMul of two activations")
        n = graph.nodes[idx]
        if n.op_type == "MatMul":
            qk = idx
            break
        if n.op_type not in ARITH | {"Cast", "Identity"}:
            raise Reject(f"{n.op_type} node {graph.labels[idx]} before the softmax is not a scale or mask")
        value = max((v for v in n.input if v and v not in graph.inits and graph.const_value(v) is None),
                    key=lambda v: math.prod(_dims(probes, v)[0]), default=None)
        if value is None:
            raise Reject(f"{n.op_type} node {graph.labels[idx]} has only constant operands")
    if any(v in graph.inits for v in graph.nodes[qk].input):
        raise Reject("the softmax input is a MatMul with a weight (not Q K^T)")
    value = node.output[0]
    while True:
        readers = graph.readers.get(value, [])
        if len(readers) != 1:
            raise Reject(f"the attention probabilities are read by {len(readers)} nodes")
        n = graph.nodes[readers[0]]
        if n.op_type == "MatMul" and n.input[0] == value and n.input[1] not in graph.inits:
            return qk, readers[0]
        if n.op_type not in ("Cast", "Identity", "Dropout"):
            raise Reject(f"{n.op_type} node {graph.labels[readers[0]]} reads the attention probabilities "
                         "(not P V)")
        value = n.output[0]


def _block(graph: GraphIndex, sites: set[str], probes: list[Probe], i: int, opset: int) -> HeadGroup:
    qk, pv = _core(graph, probes, i)
    q_in, k_in = graph.nodes[qk].input[:2]
    d_probe = {p.dims[q_in][-1] for p in probes if q_in in p.dims}
    if len(d_probe) != 1:
        raise Reject("the Q K^T contraction size is unknown")
    d = d_probe.pop()
    producers: dict[str, int] = {}
    for v in (q_in, k_in, graph.nodes[pv].input[1]):
        _back(graph, probes, v, sites, producers)
    wo_index, e_in = _forward_consumer(graph, graph.nodes[pv].output[0], sites)
    if e_in % d or e_in // d < 2:
        raise Reject(f"the output projection reads {e_in} features, not a multiple of >= 2 heads of {d}")
    heads = e_in // d
    from .heads_walk import HeadWalker

    walker = HeadWalker(graph, probes, heads, d, opset)
    for out, idx in sorted(producers.items(), key=lambda kv: kv[1]):
        walker.producer(idx, e_in)
    walker.run()
    consumer = walker.consumer
    if consumer is None or consumer[0] != wo_index:
        raise Reject("the heads do not reach the output projection found after P V")
    wo = graph.nodes[wo_index]
    bias = wo.input[2] if wo.op_type == "Gemm" and len(wo.input) > 2 and wo.input[2] else None
    out_features = graph.dims(wo.input[1])[0 if int(attr(wo, "transB", 0)) else 1] if wo.op_type == "Gemm" else 0
    if bias is not None and not (bias in graph.inits and graph.dims(bias) == [out_features]
                                 and graph.readers.get(bias) == [wo_index] and bias not in graph.outputs):
        bias = None  # broadcast or shared: no bias compensation
    graph.own(wo.input[1], wo_index, "output projection weight")
    cons = Consumer(wo.input[1], graph.labels[wo_index], wo.op_type, d, bias)
    return HeadGroup(graph.labels[i], heads, d, tuple(graph.nodes[j].input[1] for j in sorted(producers.values())),
                     walker.slices, cons, walker.reshapes, walker.ann)

