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
* depthwise convolutions (``group`` = channels, one filter each) and Resize by constant scales pass the
  channels through; the depthwise filters, bias entries and ``group`` attribute shrink with them;
* the *consumers*: Conv (``group == 1``) input channels, Gemm/MatMul input features (in blocks of
  ``H*W`` after a Flatten), whose weights lose those input columns.

Removing channel ``j`` of the producer is then exactly the same function as zeroing the consumers'
input columns of ``j`` (what the selection in :mod:`fls_compress.structured.selection` evaluates).
Two-input element-wise nodes whose other operand is derived from the same channels (``x * sigmoid(x)``,
i.e. SiLU) pass them through too, and so do Reduce* nodes over the other axes. Everything that would need
more than that (two branches meeting in Add, i.e. residual-coupled channels; Reshape/Split
constants that hold the channel count; graph outputs whose shape would change; grouped convolutions;
weights or vectors shared between nodes; Constant-node weights) makes the group a :class:`Skipped`
one, with the reason, and the graph keeps it whole.

This is the dependency-graph view of structured pruning (as in Fang et al. 2023, "DepGraph"), restricted
to the patterns that can be rewritten safely without re-exporting the model.
"""

from __future__ import annotations

import onnx

from ..io.onnx_model import STORAGE_INITIALIZER, prunable_initializers
from .types import Analysis, Consumer, Group, Reject, Skipped, Slice
from .walk import GraphIndex, Walker, attr, label

__all__ = ["Analysis", "Consumer", "Group", "Skipped", "Slice", "consumer_slice", "find_groups"]

KINDS = {"channels": ("Conv",), "neurons": ("Gemm", "MatMul")}


def find_groups(model: onnx.ModelProto, kind: str) -> Analysis:
    """The groups of ``kind`` ("channels": Conv producers; "neurons": Gemm/MatMul producers), graph order."""
    graph = GraphIndex(model)
    out = Analysis()
    sites = {s.name: s for s in prunable_initializers(model)}
    for i, node in enumerate(graph.nodes):
        if node.op_type not in KINDS[kind] or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = node.input[1] if node.op_type != "MatMul" or node.input[1] in graph.inits else node.input[0]
        if weight not in sites:
            continue
        try:
            out.groups.append(_group(graph, sites, kind, i, weight))
        except Reject as exc:
            out.skipped.append(Skipped(weight, graph.labels[i], str(exc)))
    carried = {s.name: g.producer for g in out.groups for s in g.slices if s.role == "depthwise weight"}
    out.skipped = [Skipped(s.producer, s.node, f"depthwise convolution: its channels go with the group of "
                           f"{carried[s.producer]}") if s.producer in carried else s for s in out.skipped]
    return out


def _group(graph: GraphIndex, sites, kind: str, index: int, weight: str) -> Group:
    node = graph.nodes[index]
    if getattr(sites[weight], "storage", STORAGE_INITIALIZER) != STORAGE_INITIALIZER or weight not in graph.inits:
        raise Reject("the weight is a Constant node, not an initializer")
    graph.own(weight, index, "weight")
    dims = graph.dims(weight)
    if node.op_type == "Conv":
        if int(attr(node, "group", 1)) != 1:
            raise Reject("grouped / depthwise convolution (its input channels are tied to its output channels)")
        size, rank, w_axis = dims[0], len(dims), 0
    elif node.op_type == "Gemm":
        if len(dims) != 2:
            raise Reject("Gemm weight is not 2-D")
        w_axis = 0 if int(attr(node, "transB", 0)) else 1
        size, rank = dims[w_axis], 2
    else:  # MatMul
        if node.input[1] != weight or len(dims) != 2:
            raise Reject("MatMul weight is not the 2-D right operand (X @ W)")
        size, rank, w_axis = dims[1], None, 1
    if size < 2:
        raise Reject(f"only {size} output {kind}")
    walker = Walker(graph, sites, size)
    walker.slices.append(Slice(weight, w_axis, role="producer weight"))
    if len(node.input) > 2 and node.input[2]:
        if node.op_type == "Conv":
            graph.own(node.input[2], index, "bias")
            walker.slices.append(Slice(node.input[2], 0, role="producer bias"))
        else:
            walker.vector(index, node.input[2], -1, 2, "producer bias")
    walker.walk(node.output[0], -(rank - 1) if node.op_type == "Conv" else -1, rank, 1)
    walker.finish()
    if not walker.consumers:
        raise Reject("no Conv/Gemm/MatMul reads the output")
    tensors = tuple((name, axis, block, span[1]) for name, (axis, block, span) in walker.tensors.items())
    return Group(kind, weight, graph.labels[index], node.op_type, size, tuple(walker.slices),
                 tuple(walker.consumers), tensors, tuple(walker.attributes))


def consumer_slice(model: onnx.ModelProto, consumer: Consumer) -> Slice:
    """The axis of the consumer's ONNX weight that holds its input channels (``block`` per channel)."""
    node = next(n for i, n in enumerate(model.graph.node) if label(n, i) == consumer.node)
    span = {"offset": consumer.offset, "extra": consumer.extra}
    if consumer.op_type == "Conv":
        return Slice(consumer.weight, 1, 1, "consumer weight", **span)
    if consumer.op_type == "Gemm":
        return Slice(consumer.weight, 1 if int(attr(node, "transB", 0)) else 0, consumer.block, "consumer weight", **span)
    return Slice(consumer.weight, 0, consumer.block, "consumer weight", **span)
