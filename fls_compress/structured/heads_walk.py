"""Following attention heads through the graph: the rules of :mod:`fls_compress.structured.heads`.

Each head-carrying tensor has an annotation ``(axis, inner)``: along ``axis`` it is laid out
``(outer, H, inner)``, head ``h`` owning ``inner`` consecutive entries in each of the ``outer`` blocks
(``inner`` is per probe, since e.g. ``[B*H, S, d]`` has ``outer = B``). Through a reshape the head factor is
followed by its stride in the row-major flattened tensor: with ``S_h = inner * prod(dims[axis+1:])`` the
heads occupy strides ``S_h .. S_h * H``, and the output axis ``b`` with ``prod(out[b+1:]) <= S_h <
prod(out[b:])`` carries them if it holds the whole factor (``S_h`` a multiple of ``prod(out[b+1:])`` and
``prod(out[b:])`` a multiple of ``S_h * H``).
"""

from __future__ import annotations

import math

from .heads import ARITH, HeadSlice
from .shapes import Probe
from .types import Reject
from .walk import UNARY, GraphIndex, attr


def remap(in_dims: tuple[int, ...], axis: int, inner: int, heads: int, out_dims: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis, inner) of the head factor after reshaping ``in_dims`` to ``out_dims`` (None: split apart)."""
    s_h = inner * math.prod(in_dims[axis + 1:])
    span = s_h * heads
    for b in range(len(out_dims)):
        below = math.prod(out_dims[b + 1:])
        if below <= s_h < below * out_dims[b]:
            if s_h % below or (below * out_dims[b]) % span:
                return None
            return b, s_h // below
    return None


class HeadWalker:
    """Annotates the tensors reached from the projections' outputs (graph order), collecting the per-head
    initializers, the Reshape nodes on the way and the single output projection (``consumer``)."""

    def __init__(self, graph: GraphIndex, probes: list[Probe], heads: int, head_dim: int, opset: int):
        self.graph, self.probes, self.heads, self.d, self.opset = graph, probes, heads, head_dim, opset
        self.ann: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.slices: list[HeadSlice] = []
        self.reshapes: list[str] = []
        self.consumer: tuple[int, int] | None = None  # (node index, input features)
        self.starts: set[int] = set()

    def dims(self, name: str) -> list[tuple[int, ...]]:
        try:
            return [p.dims[name] for p in self.probes]
        except KeyError:
            raise Reject(f"the shape of '{name}' is unknown (not computed by the probe run)") from None

    def set(self, name: str, axis: int, inners) -> None:
        if name in self.graph.outputs:
            raise Reject(f"'{name}' carries the heads and is a graph output (its shape must not change)")
        self.ann[name] = (axis, tuple(inners))

    def producer(self, idx: int, e_in: int) -> None:
        """The projection ``idx`` (MatMul ``x @ W`` or Gemm) whose outputs are ``(O, H, d)``, ``O = F / e_in``."""
        g = self.graph
        node = g.nodes[idx]
        weight = node.input[1]
        g.own(weight, idx, "projection weight")
        dims = g.dims(weight)
        if len(dims) != 2:
            raise Reject(f"projection {g.labels[idx]} has a {len(dims)}-D weight")
        if node.op_type == "Gemm":
            if int(attr(node, "transA", 0)):
                raise Reject(f"projection {g.labels[idx]} has transA=1")
            axis = 0 if int(attr(node, "transB", 0)) else 1
        else:
            axis = 1
        features = dims[axis]
        if features % e_in:
            raise Reject(f"projection {g.labels[idx]} has {features} outputs, not a multiple of the {e_in} features of "
                         "the output projection (grouped-query or cross-size attention is not handled)")
        outer = features // e_in
        self.slices.append(HeadSlice(weight, axis, outer, self.d, "projection weight"))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            g.own(bias, idx, "projection bias")
            if g.dims(bias) == [features]:
                self.slices.append(HeadSlice(bias, 0, outer, self.d, "projection bias"))
            elif math.prod(g.dims(bias)) != 1:
                raise Reject(f"projection bias '{bias}' has shape {g.dims(bias)}")
        out = node.output[0]
        self.set(out, len(self.dims(out)[0]) - 1, [self.d] * len(self.probes))
        self.starts.add(idx)

    def run(self) -> None:
        for i, node in enumerate(self.graph.nodes):
            if i in self.starts or not any(v in self.ann for v in node.input):
                continue
            self._step(i, node)

    def _step(self, i: int, node) -> None:
        g = self.graph
        op = node.op_type
        where = f"{op} node {g.labels[i]}"
        if node.domain not in ("", "ai.onnx"):
            raise Reject(f"{where} ({node.domain}) reads the heads")
        if any(o and (o in g.readers or o in g.outputs) for o in node.output[1:]):
            raise Reject(f"{where} has a second output in use")
        x = next(v for v in node.input if v in self.ann)
        axis, inners = self.ann[x]
        out = node.output[0] if node.output else ""
        if op == "Shape":
            return  # its value is re-evaluated by the shape arithmetic check (heads_plan)
        if op in ("MatMul", "Gemm"):
            self._matmul(i, node)
        elif op in ARITH or op in ("Max", "Min", "Pow"):
            self._broadcast(i, node)
        elif node.input[0] != x:
            raise Reject(f"{where} reads the heads as a secondary operand")
        elif op in UNARY or op in ("Dropout", "Clip"):
            for v in node.input[1:]:
                if v and g.const_value(v) is None:
                    raise Reject(f"{where} has a non-constant operand '{v}'")
            self.set(out, axis, inners)
        elif op in ("Softmax", "LogSoftmax"):
            rank = len(self.dims(x)[0])
            ax = int(attr(node, "axis", -1 if self.opset >= 13 else 1)) % rank
            if ax == axis or (self.opset < 13 and axis >= ax):
                raise Reject(f"{where} normalises over the head axis")
            self.set(out, axis, inners)
        elif op == "Transpose":
            rank = len(self.dims(x)[0])
            perm = list(attr(node, "perm", list(range(rank))[::-1]))
            self.set(out, perm.index(axis), inners)
        elif op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            got = {remap(a, axis, n, self.heads, b) for a, n, b in zip(self.dims(x), inners, self.dims(out))}
            axes = {r[0] if r else None for r in got}
            if None in axes or len(axes) != 1:
                raise Reject(f"{where} splits the heads apart (or differently per batch size)")
            self.set(out, axes.pop(), [r[1] for r in (remap(a, axis, n, self.heads, b) for a, n, b in
                                                      zip(self.dims(x), inners, self.dims(out)))])
            if op == "Reshape":
                self.reshapes.append(out)
        elif op == "Gather":
            rank = len(self.dims(x)[0])
            gax = int(attr(node, "axis", 0)) % rank
            if gax == axis:
                raise Reject(f"{where} gathers along the head axis")
            ind_rank = len(self.dims(node.input[1])[0])
            self.set(out, axis + (ind_rank - 1 if gax < axis else 0), inners)
        else:
            raise Reject(f"{where} reads the heads and is not known to keep them apart")

    def _broadcast(self, i: int, node) -> None:
        g = self.graph
        where = f"{node.op_type} node {g.labels[i]}"
        out = node.output[0]
        out_dims = self.dims(out)
        rank = len(out_dims[0])
        if node.op_type == "Pow" and node.input[1] in self.ann:
            raise Reject(f"{where} uses the heads as an exponent")
        aligned = {(a + rank - len(self.dims(v)[0]), inner) for v in node.input if v in self.ann
                   for a, inner in [self.ann[v]]}
        if len(aligned) != 1:
            raise Reject(f"{where} combines tensors whose heads lie on different axes")
        axis, inners = aligned.pop()
        for v in dict.fromkeys(node.input):
            if not v or v in self.ann:
                continue
            dv = self.dims(v)
            pos = len(dv[0]) - (rank - axis)
            if pos < 0 or all(d[pos] == 1 for d in dv):
                continue  # broadcast along the heads (a scale, a [B, 1, 1, S] mask)
            if not all(d[pos] == o[axis] for d, o in zip(dv, out_dims)):
                raise Reject(f"operand '{v}' of {where} does not broadcast along the heads")
            if v not in g.inits or len(set(dv)) != 1:
                raise Reject(f"{where} combines the heads with a per-head computed tensor '{v}'")
            g.own(v, i, f"per-head operand of {where}")
            if len(set(inners)) != 1 or dv[0][pos] % (self.heads * inners[0]):
                raise Reject(f"per-head operand '{v}' of {where} does not split into {self.heads} heads")
            self.slices.append(HeadSlice(v, pos, dv[0][pos] // (self.heads * inners[0]), inners[0], "per-head constant"))
        self.set(out, axis, inners)

    def _matmul(self, i: int, node) -> None:
        g = self.graph
        where = f"{node.op_type} node {g.labels[i]}"
        a, b = node.input[0], node.input[1]
        if a in self.ann and b in self.ann and node.op_type == "MatMul":
            ra, rb, r = len(self.dims(a)[0]), len(self.dims(b)[0]), len(self.dims(node.output[0])[0])
            (xa, ia), (xb, ib) = self.ann[a], self.ann[b]
            if xa >= ra - 2 or xb >= rb - 2 or xa + r - ra != xb + r - rb or ia != ib:
                raise Reject(f"{where} multiplies tensors whose heads are not the same batch axis")
            self.set(node.output[0], xa + r - ra, ia)
            return
        if b in self.ann or a not in self.ann or b not in g.inits:
            raise Reject(f"{where} mixes the heads with another activation")
        if node.op_type == "Gemm" and int(attr(node, "transA", 0)):
            raise Reject(f"{where} has transA=1")
        axis, inners = self.ann[a]
        dims = self.dims(a)
        if axis != len(dims[0]) - 1 or any(n != self.d for n in inners) or dims[0][axis] != self.heads * self.d:
            raise Reject(f"{where} does not read the heads as {self.heads} blocks of {self.d} input features")
        if self.consumer is not None:
            raise Reject(f"{where} is a second output projection")
        self.consumer = (i, dims[0][axis])
