"""Following a producer's channels through the graph to the layers that consume them.

:class:`GraphIndex` answers who reads a value and what a constant holds; :class:`Walker` follows one
producer's output forwards, node by node, with the rules of :mod:`fls_compress.structured.groups`
(pass-through, per-channel vectors, depthwise convolutions, consumers; the steps that move the channel
axis or join other channels to it are in :mod:`.walk_layout`), and raises :class:`Reject` with a reason at
the first node it cannot rewrite safely.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .nodes import attr, label  # noqa: F401 - re-exported (groups, heads)
from .types import Consumer, Reject, Slice
from .walk_layout import LayoutSteps

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish",
    "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Identity", "Cast", "ThresholdedRelu", "Mish",
    "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "PRelu", "Max", "Min", "Pow"}
#: the Slice role of a ConvTranspose weight that reads a group's channels (input axis 0)
TRANSPOSED_READER = "transposed-conv input weight"
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
          "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"}


class GraphIndex:
    """Readers of every value (values read inside If/Loop/Scan bodies count as read by that node)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.labels = [label(n, i) for i, n in enumerate(self.nodes)]
        self.inits = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in dict.fromkeys(n.input):
                if v:
                    self.readers.setdefault(v, []).append(i)
            stack = [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
            stack += [sg for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for sg in a.graphs]
            while stack:
                body = stack.pop()
                for inner in body.node:
                    for v in inner.input:
                        if v and i not in self.readers.setdefault(v, []):
                            self.readers[v].append(i)
                    stack += [a.g for a in inner.attribute if a.type == onnx.AttributeProto.GRAPH]
        self.constants = {n.output[0]: n for n in self.nodes if n.op_type == "Constant" and n.output}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self._model, self._shapes = model, None

    def shape(self, name: str) -> list[int | None] | None:
        """The dims of ``name`` (None where symbolic) from the initializers or from onnx shape inference
        (run once, on demand); None when unknown."""
        if name in self.inits:
            return self.dims(name)
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self._model).graph
            except Exception:  # noqa: BLE001 - models over 2 GiB, unknown domains: no inferred shapes
                inferred = None
            for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output) if inferred else ():
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                             for d in vi.type.tensor_type.shape.dim]
        return self._shapes.get(name)

    def dims(self, name: str) -> list[int]:
        return [int(d) for d in self.inits[name].dims]

    def const_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output (None for anything computed)."""
        if name in self.inits:
            return onnx.numpy_helper.to_array(self.inits[name])
        node = self.constants.get(name)
        for a in node.attribute if node is not None else ():
            if a.name == "value":
                return onnx.numpy_helper.to_array(a.t)
            if a.name in ("value_ints", "value_int", "value_floats", "value_float"):
                return np.asarray(helper.get_attribute_value(a))
        return None

    def reshaped_constant(self, name: str) -> tuple[int, list[int]] | None:
        """(Reshape node index, target dims) when ``name`` is a constant tensor reshaped by constant dims, as
        older paddle2onnx exports add a Conv's bias: ``Add(conv, Reshape(bias [C], [1, C, 1, 1]))``; else None."""
        i = self.producer.get(name)
        if i is None or self.nodes[i].op_type != "Reshape" or self.nodes[i].domain not in ("", "ai.onnx"):
            return None
        node = self.nodes[i]
        data, shape = self.const_value(node.input[0]), self.const_value(node.input[1])
        if data is None or shape is None or np.asarray(shape).ndim != 1:
            return None
        dims = [int(d) for d in np.asarray(shape)]
        if not int(attr(node, "allowzero", 0)):  # 0 copies the input's dim at that position
            dims = [int(data.shape[k]) if d == 0 and k < data.ndim else d for k, d in enumerate(dims)]
        if dims.count(-1) == 1:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = data.size // known if known else 0
        if any(d < 0 for d in dims) or math.prod(dims) != data.size:
            return None
        return i, dims

    def own(self, name: str, index: int, what: str) -> None:
        """``name`` must be an initializer read by node ``index`` only (it will be rewritten)."""
        if name not in self.inits:
            raise Reject(f"{what} '{name}' is not an initializer")
        if self.readers.get(name, []) != [index] or name in self.outputs:
            raise Reject(f"{what} '{name}' is shared with other nodes")


class Walker(LayoutSteps):
    """Collects, for one producer of ``size`` channels, the slices, consumers and shrinking tensors."""

    def __init__(self, graph: GraphIndex, sites: dict, size: int):
        self.graph, self.sites, self.size = graph, sites, size
        self.slices: list[Slice] = []
        self.consumers: list[Consumer] = []
        self.tensors: dict[str, tuple[int, int, tuple[int, int]]] = {}  # name -> (axis < 0, block, span)
        #: where the group's channels sit in the current tensor's channel axis: (channels before them, channels
        #: of other tensors beside them), both 0 until a Concat joins other tensors' channels to them
        self.span: tuple[int, int] = (0, 0)
        self.pending: dict[str, tuple[int, int, tuple[int, int], str]] = {}  # operands that must turn out to be in this group
        self.attributes: list[tuple[str, str, int]] = []  # (node label, attribute = channel count, other channels)
        #: (shape constant, entry, other channels, the Reshape's output, features per channel): Reshape
        #: targets that spell the channel count out (reshaped vectors, flattens to [N, C*H*W])
        self.shape_constants: list[tuple[str, int, int, str, int]] = []

    def vector(self, index: int, name: str, axis: int, rank: int | None, role: str) -> None:
        """A constant operand broadcast against the activation: nothing to do when it does not vary along
        the channel axis (size 1 there, or absent); one :class:`Slice` when it has one entry per channel."""
        g = self.graph
        reshaped = g.reshaped_constant(name) if name not in g.inits and name not in g.constants else None
        if name not in g.inits and name not in g.constants and reshaped is None:
            raise Reject(f"{role} '{name}' of node {g.labels[index]} is not an initializer")
        if reshaped is not None:
            return self._reshaped_vector(index, name, axis, rank, role, *reshaped)
        dims = g.dims(name) if name in g.inits else list(np.asarray(g.const_value(name)).shape)
        pos = len(dims) + axis  # axis < 0 counts from the end: numpy broadcasting aligns the right
        if rank is not None and len(dims) > rank:
            raise Reject(f"{role} '{name}' has more dimensions than the activation")
        if pos < 0 or dims[pos] == 1:
            return
        if name not in g.inits:  # a Constant node (e.g. GELU's 1/sqrt(2) as exported) that varies per channel
            raise Reject(f"{role} '{name}' of node {g.labels[index]} is a per-channel Constant node (not rewritten)")
        if dims[pos] != self.size + self.span[1]:
            raise Reject(f"{role} '{name}' (shape {dims}) does not broadcast per channel")
        g.own(name, index, role)
        self.slices.append(Slice(name, pos, role=role, offset=self.span[0], extra=self.span[1]))

    def _reshaped_vector(self, index: int, name: str, axis: int, rank: int | None, role: str, r: int,
                         dims: list[int]) -> None:
        """A constant vector reshaped to broadcast per channel (``Reshape(b [C], [1, C, 1, 1])``): its data
        loses the removed channels' entries and, where the shape constant spells the channel count out, that
        entry becomes the kept count (:attr:`Walker.shape_constants`)."""
        g = self.graph
        node = g.nodes[r]
        where = f"{role} '{name}' of node {g.labels[index]} (Reshape node {g.labels[r]})"
        pos = len(dims) + axis
        if rank is not None and len(dims) > rank:
            raise Reject(f"{where} has more dimensions than the activation")
        if pos < 0 or dims[pos] == 1:
            return
        if dims[pos] != self.size + self.span[1] or math.prod(dims) != dims[pos]:
            raise Reject(f"{where} (shape {dims}) does not broadcast per channel")
        if g.readers.get(name, []) != [index] or name in g.outputs:
            raise Reject(f"{where} is shared with other nodes")
        data, shape = node.input[0], node.input[1]
        if data not in g.inits:
            raise Reject(f"{where} reshapes a Constant node (not rewritten)")
        g.own(data, r, f"data of Reshape node {g.labels[r]}")
        axes = [k for k, d in enumerate(g.dims(data)) if d != 1]
        self.slices.append(Slice(data, axes[0] if axes else 0, role=role, offset=self.span[0], extra=self.span[1]))
        if int(np.asarray(g.const_value(shape))[pos]) != -1:  # the channel count is written in the shape constant
            if g.readers.get(shape, []) != [r] or shape in g.outputs:
                raise Reject(f"shape constant '{shape}' of Reshape node {g.labels[r]} is shared with other nodes")
            self.shape_constants.append((shape, pos, self.span[1], node.output[0], 1))

    def finish(self) -> None:
        """Operands of two-input nodes that were other activations must be this group's own tensors
        (``x * sigmoid(x)``), with the same layout; anything else couples the channels to another branch."""
        for value, (axis, block, span, where) in self.pending.items():
            if self.tensors.get(value) != (axis, block, span):
                raise Reject(f"{where} combines the channels with another activation "
                             "(residual-coupled or gated channels are left whole)")

    def walk(self, value: str, axis: int, rank: int | None, block: int, span: tuple[int, int] | None = None) -> None:
        """Follow ``value`` (channel axis ``axis`` < 0, ``block`` features per channel, the group's channels at
        ``span``, by default the span of the tensor it was computed from) to its consumers."""
        g = self.graph
        span = self.span if span is None else span
        if value in self.tensors:
            if self.tensors[value] != (axis, block, span):
                raise Reject(f"'{value}' is reached twice with different channel layouts (the group channels enter it "
                             "at two places, e.g. a residual chain concatenated after every block as in YOLOv8's C2f "
                             "with shortcuts)")
            return
        if value in g.outputs:
            raise Reject(f"'{value}' is a graph output (its shape must not change)")
        self.tensors[value] = (axis, block, span)
        readers = g.readers.get(value, [])
        if not readers:
            raise Reject(f"'{value}' is not read by any node")
        outer, self.span = self.span, span
        try:
            for i in readers:
                self._step(i, value, axis, rank, block)
        finally:
            self.span = outer

    def _step(self, i: int, value: str, axis: int, rank: int | None, block: int) -> None:
        g = self.graph
        node = g.nodes[i]
        where = f"{node.op_type} node {g.labels[i]}"
        if node.domain not in ("", "ai.onnx"):
            raise Reject(f"{where} ({node.domain}) reads the channels")
        op = node.op_type
        others = [v for v in node.input if v and v != value]
        if op == "Split" and node.input[0] == value:
            return self._split(i, axis, rank, block)
        if any(o and (o in g.readers or o in g.outputs) for o in node.output[1:]):
            raise Reject(f"{where} has a second output in use")
        channel_first = rank is not None and axis == -(rank - 1) and node.input[0] == value
        if op == "Conv" and node.input[0] == value and int(attr(node, "group", 1)) == self.size + self.span[1] > 1:
            self._depthwise(i, axis, rank, block)
        elif op in ("Conv", "Gemm", "MatMul") and node.input[0] == value and len(node.input) > 1 and node.input[1] in self.sites:
            self.consumers.append(self._consumer(i, axis, rank, block))
        elif op == "ConvTranspose" and node.input[0] == value:
            self._transposed(i, axis, rank)
        elif op in UNARY or op in ("Dropout", "Clip"):
            for v in others:  # Clip bounds, Dropout ratio / training_mode
                c = g.const_value(v)
                if c is None or (op == "Clip" and np.asarray(c).size != 1):
                    raise Reject(f"{where} has a non-constant or non-scalar operand '{v}'")
                if op == "Dropout" and v == node.input[-1] and len(node.input) == 3 and bool(np.asarray(c)):
                    raise Reject(f"{where} is in training mode")
            self.walk(node.output[0], axis, rank, block)
        elif op in POOLS:
            if not channel_first:
                raise Reject(f"{where} pools a tensor whose channel axis is not 1")
            self.walk(node.output[0], axis, rank, block)
        elif op in REDUCE:
            self._reduce(i, axis, rank, block)
        elif op == "BatchNormalization":
            if not channel_first or int(attr(node, "training_mode", 0)):
                raise Reject(f"{where} normalises a tensor whose channel axis is not 1, or trains")
            for role, name in zip(("batchnorm scale", "batchnorm bias", "batchnorm mean", "batchnorm var"), node.input[1:5]):
                g.own(name, i, role)
                if g.dims(name) != [self.size + self.span[1]]:
                    raise Reject(f"{role} '{name}' has shape {g.dims(name)}, not [{self.size + self.span[1]}]")
                self.slices.append(Slice(name, 0, role=role, offset=self.span[0], extra=self.span[1]))
            self.walk(node.output[0], axis, rank, block)
        elif op in BINARY:
            if op == "PRelu" and node.input[0] != value:
                raise Reject(f"{where} reads the channels as its slope")
            for v in dict.fromkeys(others):
                if v in g.inits or v in g.constants or g.reshaped_constant(v) is not None:
                    self.vector(i, v, axis, rank, "constant")
                else:
                    self.pending.setdefault(v, (axis, block, self.span, where))
            self.walk(node.output[0], axis, rank, block)
        elif op in ("Flatten", "Reshape") and node.input[0] == value:
            self._flatten(i, axis, rank, block)
        elif op in ("Resize", "Upsample") and node.input[0] == value:
            self._resize(i, axis, rank, block)
        elif op in ("Transpose", "Squeeze", "Unsqueeze") and node.input[0] == value:
            self._move(i, axis, rank, block)
        elif op == "Concat":
            self._concat(i, value, axis, rank, block)
        elif op == "Shape":
            self._shape(i, value, axis, rank)
        elif op in ("Split", "Slice", "Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Shape", "Expand"):
            raise Reject(f"{where} indexes, reshapes or reads the shape of the channels "
                         "(rewriting its constants is not implemented)")
        else:
            raise Reject(f"{where} reads the channels and is not known to pass them through")

    def _depthwise(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """A depthwise convolution (``group`` = channels, one filter per channel: weight [C, 1, k...]) filters
        each channel on its own: it passes the channels through, losing the removed channels' filters and
        bias entries, and its ``group`` attribute becomes the kept count (MobileNet's expand -> depthwise ->
        project blocks: the expanded channels are one group)."""
        g = self.graph
        node = g.nodes[i]
        where = f"depthwise Conv node {g.labels[i]}"
        weight = node.input[1]
        if rank is None or axis != -(rank - 1):
            raise Reject(f"{where} reads a tensor whose channel axis is not 1")
        if weight not in g.inits:
            raise Reject(f"weight of {where} is not an initializer")
        if g.dims(weight)[:2] != [self.size + self.span[1], 1]:
            raise Reject(f"{where} has weight shape {g.dims(weight)} (channel multiplier other than 1)")
        g.own(weight, i, f"weight of {where}")
        offset, extra = self.span
        self.slices.append(Slice(weight, 0, role="depthwise weight", offset=offset, extra=extra))
        if len(node.input) > 2 and node.input[2]:
            g.own(node.input[2], i, f"bias of {where}")
            self.slices.append(Slice(node.input[2], 0, role="depthwise bias", offset=offset, extra=extra))
        self.attributes.append((g.labels[i], "group", extra))
        self.walk(node.output[0], axis, rank, block)

    def _transposed(self, i: int, axis: int, rank: int | None) -> None:
        """A transposed convolution (``group`` 1; weight [C_in, C_out, k...]) reading the channels as its input
        channels: its weight loses the removed channels' rows along axis 0, which is the same function as
        zeroing them. It is not a :class:`Consumer`: structured OBS has no Hessian for it (the stage skips
        such groups for ``-m sparsegpt`` with the reason; L2 selection needs none)."""
        g = self.graph
        node = g.nodes[i]
        where = f"ConvTranspose node {g.labels[i]}"
        weight = node.input[1] if len(node.input) > 1 else ""
        if int(attr(node, "group", 1)) != 1:
            raise Reject(f"{where} is a grouped transposed convolution")
        if rank is None or axis != -(rank - 1):
            raise Reject(f"{where} reads a tensor whose channel axis is not 1")
        if weight not in g.inits:
            raise Reject(f"weight of {where} is not an initializer")
        g.own(weight, i, f"weight of {where}")
        if g.dims(weight)[0] != self.size + self.span[1]:
            raise Reject(f"{where} has weight shape {g.dims(weight)}, not {self.size + self.span[1]} input channels")
        self.slices.append(Slice(weight, 0, role=TRANSPOSED_READER, offset=self.span[0], extra=self.span[1]))

    def _consumer(self, i: int, axis: int, rank: int | None, block: int) -> Consumer:
        g = self.graph
        node = g.nodes[i]
        where = f"consumer {node.op_type} node {g.labels[i]}"
        weight = node.input[1]
        if weight not in g.inits:
            raise Reject(f"weight of {where} is not an initializer")
        g.own(weight, i, f"weight of {where}")
        dims = g.dims(weight)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if node.op_type == "Conv":
            if int(attr(node, "group", 1)) != 1:
                raise Reject(f"{where} is a grouped / depthwise convolution")
            if rank is None or axis != -(rank - 1) or len(dims) != rank or dims[1] != self.size + self.span[1]:
                raise Reject(f"{where} does not read the channels as its input channels")
            if bias is not None:
                g.own(bias, i, f"bias of {where}")
            return Consumer(weight, g.labels[i], "Conv", int(math.prod(dims[2:])), bias, *self.span)
        if axis != -1 or len(dims) != 2:
            raise Reject(f"{where} does not read the channels as its input features")
        if node.op_type == "Gemm":
            if int(attr(node, "transA", 0)):
                raise Reject(f"{where} has transA=1")
            trans_b = int(attr(node, "transB", 0))
            in_features, out_features = (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
            if bias is not None and not (bias in g.inits and g.dims(bias) == [out_features]
                                         and g.readers.get(bias) == [i] and bias not in g.outputs):
                bias = None  # broadcast or shared: no bias compensation (the consumer itself is fine)
        else:
            in_features, bias = dims[0], None
        total = self.size + self.span[1]
        if block == 0:
            if in_features % total:
                raise Reject(f"{where} has {in_features} input features, not a multiple of {total} channels")
            block = in_features // total
        if in_features != total * block:
            raise Reject(f"{where} has {in_features} input features, not {total} x {block}")
        return Consumer(weight, g.labels[i], node.op_type, block, bias, *self.span)
