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
* nodes that move the channel axis without reading the channel count: ``Transpose`` and ``Squeeze`` /
  ``Unsqueeze`` with constant axes (the NHWC<->NCHW layout changes of channel-last exports, tf2onnx/Keras);
* ``Concat`` along the channel axis: the group's channels go on at an offset among the other inputs'
  (whose producers are groups of their own), and what follows loses only the group's entries;
* ``Split`` along the channel axis with constant sizes: the part holding the group's channels carries them
  on and its size entry becomes the kept count; when a producer's whole output is split (YOLOv8's C2f
  ``cv1(x).split((c, c), 1)``), each part is a group of its own (:attr:`Group.part`, reported as
  ``weight#k``), the producer's rows of that part at their offset;
* depthwise convolutions (``group`` = channels, one filter each) and Resize by constant scales pass the
  channels through; the depthwise filters, bias entries and ``group`` attribute shrink with them;
* the *consumers*: Conv (``group == 1``) input channels, Gemm/MatMul input features (in blocks of
  ``H*W`` after a Flatten), whose weights lose those input columns; a ``ConvTranspose`` (``group == 1``,
  the upsampling heads of segmentation / text-detection models) loses its weight's input rows too, but is
  no consumer for structured OBS (no Hessian of it: such groups are L2-only).

Removing channel ``j`` of the producer is then exactly the same function as zeroing the consumers'
input columns of ``j`` (what the selection in :mod:`fls_compress.structured.selection` evaluates).
Two-input element-wise nodes whose other operand is derived from the same channels (``x * sigmoid(x)``,
i.e. SiLU) pass them through too, and so do Reduce* nodes over the other axes. When the other operand
comes from other layers (a residual Add, a squeeze-excitation gate), those layers join the group as
*coupled* producers: channel j of every one of them goes together. Everything that would need more than
that (an operand traced back to a graph input, or to a layer that also reads the group's channels, as in
a residual block whose input and output are tied; Reshape/Split constants that hold the channel count of
an activation (those of a constant vector reshaped to broadcast per channel, ``Reshape(b, [1, C, 1, 1])`` as
older paddle2onnx exports add biases, are rewritten);
graph outputs whose shape would change; grouped convolutions; weights or vectors shared between nodes;
Constant-node weights in IR < 4 models) makes the group a :class:`Skipped` one, with the reason, and the
graph keeps it whole.

This is the dependency-graph view of structured pruning (as in Fang et al. 2023, "DepGraph"), restricted
to the patterns that can be rewritten safely without re-exporting the model.
"""

from __future__ import annotations

import onnx

from ..io.onnx_model import STORAGE_INITIALIZER, prunable_initializers
from .types import Analysis, Consumer, Group, Reject, Skipped, Slice, SplitParts
from .walk import BINARY, POOLS, TRANSPOSED_READER, UNARY, GraphIndex, Walker, attr, label

__all__ = ["Analysis", "Consumer", "Group", "Skipped", "Slice", "consumer_slice", "find_groups"]

KINDS = {"channels": ("Conv",), "neurons": ("Gemm", "MatMul")}


def find_groups(model: onnx.ModelProto, kind: str) -> Analysis:
    """The groups of ``kind`` ("channels": Conv producers; "neurons": Gemm/MatMul producers), graph order."""
    graph = GraphIndex(model)
    out = Analysis()
    sites = {s.name: s for s in prunable_initializers(model)}
    claimed: set[str] = set()  # producers already in a (coupled) group
    for i, node in enumerate(graph.nodes):
        weight = _weight(graph, sites, kind, node)
        if weight is None or weight in claimed:
            continue
        try:
            made = [_group(graph, sites, kind, i)]
        except SplitParts as exc:  # one group per part of the Split (each part's channels go on their own way)
            made = []
            for k, (start, count) in enumerate(exc.parts):
                try:
                    made.append(_group(graph, sites, kind, i, (k, len(exc.parts), start, count)))
                except Reject as why:
                    out.skipped.append(Skipped(f"{weight}#{k}", graph.labels[i], f"part {k} of {exc}: {why}"))
        except Reject as exc:
            out.skipped.append(Skipped(weight, graph.labels[i], str(exc)))
            continue
        out.groups += made
        for group in made:
            claimed.update((group.producer, *group.coupled))
    carried = {s.name: g.producer for g in out.groups for s in g.slices if s.role == "depthwise weight"}
    out.skipped = [Skipped(s.producer, s.node, f"depthwise convolution: its channels go with the group of "
                           f"{carried[s.producer]}") if s.producer in carried else s
                   for s in out.skipped if s.producer not in claimed]
    return out


def _weight(graph: GraphIndex, sites, kind: str, node: onnx.NodeProto) -> str | None:
    if node.op_type not in KINDS[kind] or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = node.input[1] if node.op_type != "MatMul" or node.input[1] in graph.inits else node.input[0]
    return weight if weight in sites else None


def _layout(graph: GraphIndex, sites, kind: str, index: int, weight: str) -> tuple[int, int | None, int]:
    """(output channels, output rank or None, weight axis of the channels) of a producer, or Reject."""
    node = graph.nodes[index]
    if getattr(sites[weight], "storage", STORAGE_INITIALIZER) != STORAGE_INITIALIZER or weight not in graph.inits:
        raise Reject("the weight is a Constant node, not an initializer")
    graph.own(weight, index, "weight")
    dims = graph.dims(weight)
    if node.op_type == "Conv":
        if int(attr(node, "group", 1)) != 1:
            raise Reject("grouped / depthwise convolution (its input channels are tied to its output channels)")
        return dims[0], len(dims), 0
    if node.op_type == "Gemm":
        if len(dims) != 2:
            raise Reject("Gemm weight is not 2-D")
        w_axis = 0 if int(attr(node, "transB", 0)) else 1
        return dims[w_axis], 2, w_axis
    if node.input[1] != weight or len(dims) != 2:  # MatMul
        raise Reject("MatMul weight is not the 2-D right operand (X @ W)")
    return dims[1], None, 1


def _group(graph: GraphIndex, sites, kind: str, index: int, part: tuple[int, int, int, int] | None = None) -> Group:
    """The group of the producer at ``index``: its channels followed to the consumers. Where an element-wise
    node combines them with another activation (a residual Add, a gate ``x * sigmoid(f(x))``), the layers
    that compute that activation's channels join the group (channel j of every one of them goes together,
    as in DepGraph's grouping, Fang et al. 2023) and the walk is redone from all of them. ``part`` (k, parts,
    start, count): only the producer's channels start..start+count, part k of a Split of its output."""
    weight = _weight(graph, sites, kind, graph.nodes[index])
    size = _layout(graph, sites, kind, index, weight)[0] if part is None else part[3]
    if size < 2:
        raise Reject(f"only {size} output {kind}")
    producers = [index]
    while True:
        walker = Walker(graph, sites, size)
        try:
            for n, i in enumerate(producers):
                _start(walker, graph, sites, kind, i, size, part[2] if part is not None and n == 0 else None)
        except SplitParts as exc:
            if part is not None or len(producers) > 1:  # parts of parts, or of coupled producers: not modelled
                raise Reject(str(exc)) from None
            raise
        unresolved = [v for v in walker.pending if v not in walker.tensors]
        if not unresolved:
            break
        more = [j for v in unresolved for j in _sources(graph, kind, v, walker.pending[v][3])]
        more = [j for j in dict.fromkeys(more) if j not in producers]
        if not more:
            break
        producers += more
    walker.finish()
    if not walker.consumers and not any(s.role == TRANSPOSED_READER for s in walker.slices):
        raise Reject("no Conv/Gemm/MatMul reads the output")
    coupled = tuple(_weight(graph, sites, kind, graph.nodes[i]) for i in producers[1:])
    both = set((weight, *coupled)) & {c.weight for c in walker.consumers}
    if both:
        raise Reject(f"{sorted(both)[0]} both reads and computes the coupled channels (residual-coupled channels: "
                     "a block's input and output channels are tied)")
    tensors = tuple((name, axis, block, span[1]) for name, (axis, block, span) in walker.tensors.items())
    return Group(kind, weight, graph.labels[index], graph.nodes[index].op_type, size, tuple(walker.slices),
                 tuple(walker.consumers), tensors, tuple(walker.attributes), coupled, tuple(walker.shape_constants),
                 None if part is None else part[:2])


def _start(walker: Walker, graph: GraphIndex, sites, kind: str, index: int, size: int, start: int | None = None) -> None:
    """Add a producer's weight rows and bias to the group and walk its output (``start``: the group is the
    ``size`` channels from ``start`` on, one part of a Split of the output)."""
    node = graph.nodes[index]
    weight = _weight(graph, sites, kind, node)
    if weight is None:
        raise Reject(f"{node.op_type} node {graph.labels[index]} computes coupled channels but is not a prunable layer")
    n, rank, w_axis = _layout(graph, sites, kind, index, weight)
    if start is None and n != size:
        raise Reject(f"{graph.labels[index]} couples {n} channels with {size}")
    span = (0, 0) if start is None else (start, n - size)
    walker.slices.append(Slice(weight, w_axis, role="producer weight", offset=span[0], extra=span[1]))
    if len(node.input) > 2 and node.input[2]:
        if node.op_type == "Conv":
            graph.own(node.input[2], index, "bias")
            walker.slices.append(Slice(node.input[2], 0, role="producer bias", offset=span[0], extra=span[1]))
        else:
            outer, walker.span = walker.span, span
            try:
                walker.vector(index, node.input[2], -1, 2, "producer bias")
            finally:
                walker.span = outer
    walker.walk(node.output[0], -(rank - 1) if node.op_type == "Conv" else -1, rank, 1, span)


def _sources(graph: GraphIndex, kind: str, value: str, where: str,
             seen: set[str] | None = None) -> list[int]:
    """The producer layers whose channels reach ``value`` element-wise (through activations, BatchNorm,
    pooling, Resize, depthwise convolutions and other element-wise nodes)."""
    seen = set() if seen is None else seen
    if value in seen:
        return []
    seen.add(value)
    i = graph.producer.get(value)
    if i is None:
        raise Reject(f"{where} combines the channels with '{value}', a graph input (residual-coupled channels)")
    node = graph.nodes[i]
    op = node.op_type
    if op in KINDS[kind] and not (op == "Conv" and int(attr(node, "group", 1)) != 1):
        return [i]
    if op in UNARY or op in POOLS or op in ("Clip", "Dropout", "BatchNormalization", "Resize", "Upsample") or (
            op == "Conv" and int(attr(node, "group", 1)) > 1 and node.input[1] in graph.inits
            and graph.dims(node.input[1])[:2] == [int(attr(node, "group", 1)), 1]):
        return _sources(graph, kind, node.input[0], where, seen)
    if op in BINARY:
        found = []
        for v in dict.fromkeys(node.input):
            if v and v not in graph.inits and v not in graph.constants and graph.reshaped_constant(v) is None:
                found += _sources(graph, kind, v, where, seen)
        return found
    raise Reject(f"{where} combines the channels with '{value}', computed by {op} node {graph.labels[i]} "
                 "(not traced back to prunable layers: residual-coupled channels are left whole)")


def consumer_slice(model: onnx.ModelProto, consumer: Consumer) -> Slice:
    """The axis of the consumer's ONNX weight that holds its input channels (``block`` per channel)."""
    node = next(n for i, n in enumerate(model.graph.node) if label(n, i) == consumer.node)
    span = {"offset": consumer.offset, "extra": consumer.extra}
    if consumer.op_type == "Conv":
        return Slice(consumer.weight, 1, 1, "consumer weight", **span)
    if consumer.op_type == "Gemm":
        return Slice(consumer.weight, 1 if int(attr(node, "transB", 0)) else 0, consumer.block, "consumer weight", **span)
    return Slice(consumer.weight, 0, consumer.block, "consumer weight", **span)
