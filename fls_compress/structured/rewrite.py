"""Rewrite an ONNX graph with a structural group's removed channels cut out of its tensors.

Only initializers change (and the ``group`` attribute of depthwise convolutions the channels pass, and the
channel entry of the shape constant of a vector reshaped to broadcast per channel): each :class:`~fls_compress.structured.groups.Slice` of the group is replaced
by the entries of the kept channels (same name, same position in the initializer list, same element
type), the consumers' weights (and biases) by their compensated values first when given. Nodes, names,
graph inputs/outputs, opsets and metadata stay as they are. The activations between producer and
consumers get smaller: their ``value_info`` entries are updated where the channel dimension is a known
number and removed where it is not (shape inference recomputes them); an initializer that is also
listed as a graph input (IR < 4 models) gets its declared shape updated. Weights stored as ``Constant``
nodes are first moved to initializers of the same name (:func:`promote_constants`).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .groups import Group, Slice
from .walk import GraphIndex, label


def promote_constants(model: onnx.ModelProto) -> list[str]:
    """Move float tensors held by ``Constant`` nodes of the top-level graph into initializers of the same
    name (in place), when the model stores its layer weights that way (paddle2onnx writes every weight,
    bias and BatchNorm vector as a Constant node). The function is unchanged; scalars, integer (shape)
    constants, graph outputs and models below IR 4 (whose initializers must be graph inputs) keep their
    Constant nodes. Returns the promoted names."""
    from ..bridge.prep import move_constants_to_initializers
    from ..io.onnx_model import STORAGE_CONSTANT, prunable_initializers

    if model.ir_version < 4 or not any(s.storage == STORAGE_CONSTANT for s in prunable_initializers(model)):
        return []
    return move_constants_to_initializers(model.graph, lambda t: math.prod(t.dims) > 1 and np.issubdtype(
        helper.tensor_dtype_to_np_dtype(t.data_type), np.floating))


def used_names(model: onnx.ModelProto) -> set[str]:
    """Every name a new tensor must not take: initializers, node outputs and graph inputs."""
    return ({t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
            | {v.name for v in model.graph.input})


def fresh_name(used: set[str], base: str) -> str:
    """``base``, or ``base_k`` with the least k >= 1 that is not in ``used``; the name is added to ``used``."""
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def explicit_splits(model: onnx.ModelProto) -> list[str]:
    """Give every ``Split`` its own constant sizes (:func:`_own_split_sizes`), and every one that divides by ``num_outputs`` (opset 18, as the torch dynamo exporter
    writes ``chunk``) its sizes as a constant ``split`` input instead (in place), where the split dimension is
    known from shape inference: the same function (ONNX: ceil(D / n) per output, the last one the rest), and
    sizes that a structured prune can then change per output. Returns the changed Split nodes' outputs[0]."""
    splits = [n for n in model.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")]
    done = _own_split_sizes(model, splits)
    todo = [n for n in splits if any(a.name == "num_outputs" for a in n.attribute) and not (len(n.input) > 1 and n.input[1])]
    if not todo:
        return done
    index = GraphIndex(model)  # its shapes: onnx shape inference, None where unknown (> 2 GiB, unknown domains)
    used = used_names(model)
    for node in todo:
        shape = index.shape(node.input[0])
        parts = int(next(a.i for a in node.attribute if a.name == "num_outputs"))
        axis = int(next((a.i for a in node.attribute if a.name == "axis"), 0))
        if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] is None or parts != len(node.output):
            continue
        total = int(shape[axis])
        chunk = -(-total // parts)
        sizes = [chunk] * (parts - 1) + [total - chunk * (parts - 1)]
        if min(sizes) < 0:
            continue
        name = fresh_name(used, f"{node.output[0]}_split_sizes")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), name))
        kept = [a for a in node.attribute if a.name != "num_outputs"]
        del node.attribute[:]
        node.attribute.extend(kept)
        del node.input[1:]
        node.input.append(name)
        done.append(node.output[0])
    return done


def _own_split_sizes(model: onnx.ModelProto, splits: list[onnx.NodeProto]) -> list[str]:
    """Splits whose constant sizes (initializer or Constant node) are also read by other nodes (the torch exporter shares equal
    constants, e.g. two C2f blocks' ``[c, c]``) get a copy of their own (in place), so that pruning one Split's
    parts leaves the other's sizes alone. Returns the Split nodes' outputs[0]."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inits.update({n.output[0]: numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                  and len(n.output) == 1 for a in n.attribute if a.name == "value"})  # the legacy exporter's form
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for v in dict.fromkeys(n.input):
            readers[v] = readers.get(v, 0) + 1
    used = used_names(model)
    graph_io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    done = []
    for node in splits:
        sizes = node.input[1] if len(node.input) > 1 else ""
        if sizes not in inits or readers.get(sizes, 0) < 2 or sizes in graph_io:
            continue
        name = fresh_name(used, f"{node.output[0]}_split_sizes")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(inits[sizes]).copy(), name))
        node.input[1] = name
        readers[sizes] -= 1
        done.append(node.output[0])
    return done


def take(arr: np.ndarray, keep: np.ndarray, axis: int, block: int, offset: int = 0, extra: int = 0) -> np.ndarray:
    """``arr`` with only the kept channels (``block`` consecutive entries each) along ``axis``; after a
    Concat the group's channels start at channel ``offset`` and ``extra`` channels of other tensors stay."""
    channels = np.asarray(keep, dtype=np.int64)
    if offset or extra:
        total = arr.shape[axis] // block
        channels = np.concatenate([np.arange(offset), offset + channels, np.arange(total - extra + offset, total)])
    idx = (channels[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return np.take(arr, idx, axis=axis)


def read(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Put ``value`` (cast to the old element type) in place of initializer ``name``."""
    for t in model.graph.initializer:
        if t.name == name:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
            break
    else:
        raise KeyError(name)
    # an initializer listed as a graph input declares its shape there; the torch dynamo exporter also writes
    # value_info entries for initializers (stale ones make shape inference fail)
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in value.shape:
                shape.dim.add().dim_value = int(d)


def shrink(model: onnx.ModelProto, group: Group, keep: np.ndarray, consumer_slices: list[Slice],
           new_values: dict[str, np.ndarray] | None = None) -> dict[str, tuple[list[int], list[int]]]:
    """Cut ``group`` down to the channels ``keep`` in ``model`` (in place).

    ``consumer_slices``: the consumers' weight slices (:func:`~fls_compress.structured.groups.consumer_slice`);
    ``new_values``: replacement arrays (ONNX layout, full size) applied before slicing, e.g. compensated
    consumer weights and biases. Returns ``{initializer: (shape before, shape after)}``."""
    new_values = new_values or {}
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    shapes: dict[str, tuple[list[int], list[int]]] = {}
    for s in list(group.slices) + list(consumer_slices):
        arr = read(model, s.name)
        out = take(new_values.get(s.name, arr), keep, s.axis, s.block, s.offset, s.extra)
        replace_initializer(model, s.name, out)
        shapes[s.name] = (list(arr.shape), list(out.shape))
    touched = set(shapes)
    for name, value in new_values.items():  # compensated arrays that are not sliced (consumer biases)
        if name not in touched:
            before = list(read(model, name).shape)
            replace_initializer(model, name, value)
            shapes[name] = (before, list(np.shape(value)))
    wanted = {(lbl, name): extra for lbl, name, extra in group.attributes}  # depthwise: group = channels left
    for i, node in enumerate(model.graph.node if wanted else ()):
        for a in node.attribute:
            if (label(node, i), a.name) in wanted:
                a.i = len(keep) + wanted[label(node, i), a.name]
    for name, pos, extra, reshaped, per in group.shape_constants:  # Reshape(b, [1, C, 1, 1]) -> [1, kept, 1, 1]
        _set_shape_entry(model, name, pos, (len(keep) + extra) * per)
        _drop_value_info(model, reshaped)
    _update_value_info(model, group, len(keep))
    return shapes


def _set_shape_entry(model: onnx.ModelProto, name: str, pos: int, value: int) -> None:
    """Entry ``pos`` of the 1-D integer constant ``name`` (an initializer or a Constant node's ``value``)
    set to ``value``."""
    tensors = [t for t in model.graph.initializer if t.name == name]
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" and list(n.output) == [name]
                for a in n.attribute if a.name == "value"]
    if not tensors:
        raise KeyError(name)
    values = numpy_helper.to_array(tensors[0]).copy()
    values[pos] = value
    tensors[0].CopyFrom(numpy_helper.from_array(values, tensors[0].name))


def _drop_value_info(model: onnx.ModelProto, name: str) -> None:
    entries = [vi for vi in model.graph.value_info if vi.name != name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(entries)


def _update_value_info(model: onnx.ModelProto, group: Group, kept: int) -> None:
    changed = {name: (axis, block, extra) for name, axis, block, extra in group.tensors}
    entries = list(model.graph.value_info)
    keep_entries = []
    for vi in entries:
        if vi.name not in changed:
            keep_entries.append(vi)
            continue
        axis, block, extra = changed[vi.name]
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if block and len(dims) >= -axis and dims[axis].HasField("dim_value"):
            dims[axis].dim_value = (kept + extra) * block
            keep_entries.append(vi)
        # else: the new size is not known here; dropped (onnx / onnxruntime infer it)
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_entries)
