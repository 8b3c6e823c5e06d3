"""Rewrite an attention block with ``H'`` of its ``H`` heads: smaller tensors, and Reshape targets that agree.

:func:`plan` decides, for every Reshape that carries the head axis, whether its target shape in the pruned
graph is still right: it re-evaluates the shape arithmetic with the shrunk shapes
(:class:`~fls_compress.structured.shapes.ShapeEvaluator`); a target that computes the new shape by itself
(``0`` / ``-1`` entries, or read from a tensor that shrinks too) is left alone; one whose head entry holds
the old count (``H``, ``H*d``, ``B*H``, ``3*H*d``, a constant or computed from shapes that do not shrink)
gets that entry scaled by ``H'/H``: a new int64 constant, or ``Mul`` + ``Div`` nodes on the computed value.
Any other node that reads a shape value that would change (a ``Shape`` of a head tensor used outside the
Reshape targets) leaves the block whole. :func:`apply` then cuts the heads out of the initializers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .groups import consumer_slice
from .heads import HeadGroup
from .rewrite import fresh_name, read, replace_initializer, take, used_names
from .shapes import Probe, ShapeEvaluator, resolve_reshape
from .types import Reject
from .walk import attr, label


@dataclass(frozen=True)
class Patch:
    """Reshape ``node`` (its output name) gets its target ``shape`` entry ``entry`` scaled by H'/H; ``value``:
    the new constant target when the old one was a constant, else None (Mul/Div nodes are inserted)."""

    node: str
    shape: str
    entry: int
    size: int  # entries of the target
    value: tuple[int, ...] | None


def take_heads(arr: np.ndarray, keep: np.ndarray, axis: int, outer: int, heads: int, inner: int) -> np.ndarray:
    """``arr`` with only the kept heads along ``axis`` laid out (outer, heads, inner)."""
    keep = np.asarray(keep, dtype=np.int64)
    idx = (np.arange(outer)[:, None, None] * heads + keep[None, :, None]) * inner + np.arange(inner)[None, None, :]
    return np.take(arr, idx.reshape(-1), axis=axis)


def scaled_dims(group: HeadGroup, probes: list[Probe], kept: int) -> list[dict[str, tuple[int, ...]]]:
    """Every head-carrying tensor's dims with ``kept`` heads, per probe."""
    out = []
    for p, probe in enumerate(probes):
        dims = {}
        for name, (axis, _) in group.ann.items():
            d = list(probe.dims[name])
            d[axis] = d[axis] // group.heads * kept
            dims[name] = tuple(d)
        out.append(dims)
    return out


def plan(model: onnx.ModelProto, probes: list[Probe], group: HeadGroup, kept: int) -> tuple[list[Patch], set[str]]:
    """The Reshape patches for ``kept`` heads and the names of the shape values that change by themselves."""
    scaled = scaled_dims(group, probes, kept)
    ev = ShapeEvaluator(model, probes, scaled)
    ev.run()
    nodes = {n.output[0]: (i, n) for i, n in enumerate(model.graph.node) if n.output}
    inits = {t.name for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    changed = set().union(*(c.keys() for c in ev.changed))
    patches = []
    for out in group.reshapes:
        i, node = nodes[out]
        x, s = node.input[0], node.input[1]
        allowzero = bool(attr(node, "allowzero", 0))
        k = group.ann[out][0]
        autos = [ev.changed[p].get(s, probe.values.get(s)) for p, probe in enumerate(probes)]
        if any(a is None for a in autos):
            raise Reject(f"the target shape of Reshape {label(node, i)} is not computable from the probes")
        want = [sc[out] for sc in scaled]
        ins = [sc[x] for sc in scaled]
        if all(resolve_reshape(a, t, allowzero) == w for a, t, w in zip(ins, autos, want)):
            continue
        cands = []
        for t in autos:
            v = np.array(t, dtype=np.int64).reshape(-1)
            if k >= v.size or v[k] in (0, -1) or v[k] % group.heads:
                raise Reject(f"Reshape {label(node, i)} target entry {k} ({v[k] if k < v.size else '?'}) "
                             f"does not hold a multiple of the {group.heads} heads")
            v[k] = v[k] // group.heads * kept
            cands.append(v)
        if not all(resolve_reshape(a, t, allowzero) == w for a, t, w in zip(ins, cands, want)):
            raise Reject(f"Reshape {label(node, i)}: no rewrite of its target gives the pruned shape")
        constant = (s in inits or s in consts) and s not in changed and all(np.array_equal(cands[0], c) for c in cands)
        patches.append(Patch(out, s, k, int(cands[0].size), tuple(int(v) for v in cands[0]) if constant else None))
    own = {p.node for p in patches} | set(group.reshapes)
    for i, node in ev.opaque:
        if node.op_type == "Reshape" and node.output[0] in own and node.input[0] not in changed:
            continue
        raise Reject(f"{node.op_type} node {label(node, i)} reads a shape value of the head tensors that "
                     "would change (not a Reshape target this rewrite understands)")
    return patches, changed


def _fresh(model: onnx.ModelProto, base: str) -> str:
    return fresh_name(used_names(model), base)


def _patch(model: onnx.ModelProto, patch: Patch, heads: int, kept: int, made: dict) -> None:
    g = model.graph
    i, node = next((i, n) for i, n in enumerate(g.node) if n.output and n.output[0] == patch.node)
    if patch.value is not None:  # one new constant per distinct (old target, new value)
        key = (patch.shape, patch.value)
        if key not in made:
            made[key] = _fresh(model, f"{patch.shape}_heads{kept}")
            g.initializer.append(numpy_helper.from_array(np.asarray(patch.value, dtype=np.int64), made[key]))
        node.input[1] = made[key]
        return
    if _rescale_earlier_patch(model, patch, heads, kept):
        return
    num = np.ones(patch.size, dtype=np.int64)
    den = np.ones(patch.size, dtype=np.int64)
    num[patch.entry], den[patch.entry] = kept, heads
    names = [_fresh(model, f"{patch.node}_heads_{w}") for w in ("num", "den")]
    g.initializer.extend([numpy_helper.from_array(num, names[0]), numpy_helper.from_array(den, names[1])])
    mul_out = _fresh(model, f"{patch.node}_heads_mul")
    div_out = _fresh(model, f"{patch.node}_heads_target")
    new = [helper.make_node("Mul", [patch.shape, names[0]], [mul_out], name=mul_out),
           helper.make_node("Div", [mul_out, names[1]], [div_out], name=div_out)]
    node.input[1] = div_out
    for k, n in enumerate(new):
        g.node.insert(i + k, n)


def _rescale_earlier_patch(model: onnx.ModelProto, patch: Patch, heads: int, kept: int) -> bool:
    """A computed target that an earlier head prune already scaled (``Div(Mul(shape, num), den)``, both
    written by :func:`_patch`; a gradual prune's later step) gets its fraction updated in place, num/den
    times kept/heads (reduced), instead of a second Mul/Div pair; ``False`` if the target is not one."""
    g = model.graph
    made = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    div = made.get(patch.shape)
    if div is None or div.op_type != "Div" or "_heads_target" not in div.name:
        return False
    mul = made.get(div.input[0])
    if mul is None or mul.op_type != "Mul" or mul.input[1] not in inits or div.input[1] not in inits:
        return False
    num, den = (numpy_helper.to_array(inits[n]).astype(np.int64) for n in (mul.input[1], div.input[1]))
    if num.shape != (patch.size,) or den.shape != (patch.size,):
        return False
    num[patch.entry] *= kept
    den[patch.entry] *= heads
    common = np.gcd(num, den)
    for name, value in ((mul.input[1], num // common), (div.input[1], den // common)):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.int64), name))
    return True


def _drop_unused(model: onnx.ModelProto, names: set[str]) -> None:
    read_ = {v for n in model.graph.node for v in n.input} | {o.name for o in model.graph.output}
    gone = {n for n in names if n not in read_}
    keep = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def apply(model: onnx.ModelProto, group: HeadGroup, keep: np.ndarray, patches: list[Patch], changed: set[str],
          new_values: dict[str, np.ndarray] | None = None) -> dict[str, tuple[list[int], list[int]]]:
    """Cut ``group`` down to heads ``keep`` in ``model`` (in place); ``{initializer: (before, after)}``."""
    new_values = new_values or {}
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    kept = len(keep)
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    for s in group.slices:
        arr = read(model, s.name)
        out = take_heads(new_values.get(s.name, arr), keep, s.axis, s.outer, group.heads, s.inner)
        replace_initializer(model, s.name, out)
        shapes[s.name] = (list(arr.shape), list(out.shape))
    cs = consumer_slice(model, group.consumer)
    arr = read(model, cs.name)
    out = take(new_values.get(cs.name, arr), keep, cs.axis, cs.block)
    replace_initializer(model, cs.name, out)
    shapes[cs.name] = (list(arr.shape), list(out.shape))
    for name, value in new_values.items():
        if name not in shapes:
            before = list(read(model, name).shape)
            replace_initializer(model, name, value)
            shapes[name] = (before, list(np.shape(value)))
    old_targets = {p.shape for p in patches if p.value is not None}
    made: dict = {}
    for p in patches:
        _patch(model, p, group.heads, kept, made)
    _drop_unused(model, old_targets)
    drop = set(group.ann) | changed
    entries = [vi for vi in model.graph.value_info if vi.name not in drop]
    del model.graph.value_info[:]
    model.graph.value_info.extend(entries)
    return shapes
