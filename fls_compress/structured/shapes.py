"""Concrete shapes of an ONNX graph's tensors, and what its shape arithmetic computes after heads shrink.

Exporters compute the targets of the attention's ``Reshape`` nodes in many ways: constants (dynamo),
``Shape -> Gather/Slice -> Unsqueeze -> Concat`` of other tensors (the TorchScript exporter, HF BERT), or of
the attention tensors themselves. :func:`probe` runs the graph with onnxruntime on small batches of the
calibration inputs (two sizes when the batch axis is dynamic) and records every tensor's shape and every
small integer tensor's value. :class:`ShapeEvaluator` then re-evaluates, in numpy, the shape arithmetic
that reads the shapes of tensors whose head axis shrinks (``Shape`` of them, and every small integer op
downstream), with those shapes scaled from ``H`` to ``H'`` heads: the values the pruned graph will compute.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .walk import attr

SMALL = 64  # integer tensors up to this many elements are shape arithmetic worth recording


class Probe:
    """Shapes of all tensors (and values of the small integer ones) for one batch of calibration inputs."""

    def __init__(self, dims: dict[str, tuple[int, ...]], values: dict[str, np.ndarray], size: int):
        self.dims, self.values, self.size = dims, values, size


def probe(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[Probe]:
    """Run ``model`` on the first 2 and 3 samples (one static batch if the model fixes it); every node output
    is exposed. Constant-node and initializer values count as values too."""
    from ..io.activations import ActivationSession, prepare_feeds, usable_samples

    feeds = prepare_feeds(model, feeds)
    names = [o for n in model.graph.node for o in n.output if o]
    session = ActivationSession(model, names)
    n = int(next(iter(feeds.values())).shape[0])
    step = usable_samples(model, n, 2)[0]
    sizes = [s for s in ((step,) if step != 2 or n < 3 else (2, 3)) if s <= n] or [n]
    const = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer
             if math.prod(t.dims) <= SMALL}
    out = []
    for size in dict.fromkeys(sizes):
        got = next(session.iterate({k: v[:size] for k, v in feeds.items()}, list(feeds) + names, chunk=size))
        dims = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
        dims.update({k: tuple(int(d) for d in np.shape(v)) for k, v in got.items()})
        values = dict(const)
        values.update({k: np.asarray(v) for k, v in got.items()
                       if np.size(v) <= SMALL and np.asarray(v).dtype.kind in "iub"})
        out.append(Probe(dims, values, size))
    return out


def resolve_reshape(in_dims: tuple[int, ...], target: np.ndarray, allowzero: bool) -> tuple[int, ...] | None:
    """The output shape of ``Reshape(data of in_dims, target)`` (0 copies, -1 infers), None if invalid."""
    out = [int(v) for v in np.asarray(target).reshape(-1)]
    for i, v in enumerate(out):
        if v == 0 and not allowzero:
            if i >= len(in_dims):
                return None
            out[i] = in_dims[i]
    if out.count(-1) > 1:
        return None
    total = math.prod(in_dims)
    if -1 in out:
        rest = math.prod(v for v in out if v != -1)
        if rest == 0 or total % rest:
            return None
        out[out.index(-1)] = total // rest
    return tuple(out) if math.prod(out) == total else None


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu" and np.asarray(b).dtype.kind in "iu":
        return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(a.dtype)  # ONNX truncates
    return a / b


def _slice(data: np.ndarray, starts, ends, axes, steps) -> np.ndarray:
    axes = list(range(len(starts))) if axes is None else [int(a) % data.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)), int(st))
    return data[tuple(index)]


def _axes(node: onnx.NodeProto, ins: list) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in np.asarray(ins[1]).reshape(-1)]
    value = attr(node, "axes")
    return None if value is None else [int(a) for a in value]


def evaluate(node: onnx.NodeProto, ins: list[np.ndarray | None], in_dims: list[tuple[int, ...] | None]):
    """numpy value of the single output of a shape-arithmetic node, or None (op not interpreted)."""
    op = node.op_type
    if op == "Shape":
        d = in_dims[0]
        start, end = attr(node, "start", 0), attr(node, "end")
        return np.asarray(d[start:end] if end is not None else d[start:], dtype=np.int64)
    if any(v is None for v, name in zip(ins, node.input) if name) and op not in ("Unsqueeze", "Squeeze", "Slice"):
        return None
    if op in ("Identity",):
        return ins[0]
    if op == "Cast":
        return ins[0].astype(helper.tensor_dtype_to_np_dtype(int(attr(node, "to"))))
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=int(attr(node, "axis", 0)))
    if op == "Concat":
        return np.concatenate([np.asarray(v).reshape(-1) if np.ndim(v) == 0 else v for v in ins],
                              axis=int(attr(node, "axis", 0)))
    if op == "Unsqueeze":
        axes = _axes(node, ins)
        return None if ins[0] is None or axes is None else np.expand_dims(ins[0], tuple(sorted(axes)))
    if op == "Squeeze":
        axes = _axes(node, ins)
        if ins[0] is None:
            return None
        return np.squeeze(ins[0]) if axes is None else np.squeeze(ins[0], tuple(a % ins[0].ndim for a in axes))
    if op == "Slice":
        if ins[0] is None or ins[1] is None or ins[2] is None:
            return None
        get = lambda k: [int(v) for v in ins[k].reshape(-1)] if len(ins) > k and ins[k] is not None else None  # noqa: E731
        return _slice(ins[0], get(1), get(2), get(3), get(4))
    if op == "Reshape":
        out = resolve_reshape(ins[0].shape, ins[1], bool(attr(node, "allowzero", 0)))
        return None if out is None else ins[0].reshape(out)
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _int_div, "Equal": np.equal,
              "Max": np.maximum, "Min": np.minimum, "Mod": np.fmod if attr(node, "fmod", 0) else np.mod}
    if op in binary and len(ins) == 2:
        out = binary[op](ins[0], ins[1])
        return out.astype(ins[0].dtype) if op not in ("Equal",) else out
    if op == "Where":
        return np.where(ins[0], ins[1], ins[2])
    if op in ("Sqrt", "Neg", "Abs", "Reciprocal"):
        f = {"Sqrt": np.sqrt, "Neg": np.negative, "Abs": np.abs, "Reciprocal": np.reciprocal}[op]
        return f(ins[0]).astype(ins[0].dtype)
    if op == "ConstantOfShape":
        t = attr(node, "value")
        fill = onnx.numpy_helper.to_array(t).reshape(-1)[0] if t is not None else np.float32(0)
        return np.full([int(v) for v in ins[0]], fill)
    return None


class ShapeEvaluator:
    """The values of the shape arithmetic downstream of ``Shape`` nodes that read shrinking tensors.

    ``scaled``: tensor name -> its dims in the pruned graph, per probe. After :meth:`run`, ``changed`` maps
    each tensor whose value differs from the probe to its new value per probe, and ``opaque`` lists the
    nodes that read such a tensor but are not interpreted (the caller decides whether that is harmful)."""

    def __init__(self, model: onnx.ModelProto, probes: list[Probe], scaled: list[dict[str, tuple[int, ...]]]):
        self.model, self.probes, self.scaled = model, probes, scaled
        self.changed: list[dict[str, np.ndarray]] = [{} for _ in probes]
        self.opaque: list[tuple[int, onnx.NodeProto]] = []
        self.nodes_reading: list[tuple[int, onnx.NodeProto]] = []  # non-Shape nodes that read changed values

    def run(self) -> None:
        for i, node in enumerate(self.model.graph.node):
            is_shape = node.op_type == "Shape" and any(node.input[0] in s for s in self.scaled)
            reads = [v for v in node.input if v and any(v in c for c in self.changed)]
            if not is_shape and not reads:
                continue
            if not is_shape:
                self.nodes_reading.append((i, node))
            results = []
            for p, probe_ in enumerate(self.probes):
                ins = [self.changed[p].get(v, probe_.values.get(v)) if v else None for v in node.input]
                dims = [self.scaled[p].get(v, probe_.dims.get(v)) if v else None for v in node.input]
                value = evaluate(node, ins, dims) if len(node.output) == 1 else None
                results.append(value)
            if any(r is None for r in results):
                self.opaque.append((i, node))
                continue
            for p, value in enumerate(results):
                old = self.probes[p].values.get(node.output[0])
                if old is None or old.shape != np.shape(value) or not np.array_equal(old, value):
                    self.changed[p][node.output[0]] = np.asarray(value)
