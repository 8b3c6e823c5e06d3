"""Walker steps that move the channel axis or join other channels to it.

:class:`LayoutSteps` is mixed into :class:`fls_compress.structured.walk.Walker`: ``Resize`` by constant
scales, ``Concat`` along the channels (the group's channels at an offset among the other inputs'), ``Split``
along the channels with constant sizes (the part that holds the group's channels),
``Transpose`` / ``Squeeze`` / ``Unsqueeze`` with constant axes, Reduce* over other axes, ``Flatten``
(each channel a block of ``H*W`` features, also as a Reshape to a computed ``[N, -1]``) and Shape nodes
that read other dimensions than the channels. Each follows the node's output at the new layout with
:meth:`Walker.walk`, or raises :class:`~fls_compress.structured.types.Reject` with the reason.
"""

from __future__ import annotations

import numpy as np

from .nodes import attr
from .shape_expr import const_source, reads_only_other_dims, shape_expr
from .types import Reject, SplitParts


class LayoutSteps:
    """The layout-changing steps of the channel walk (needs the walker's ``graph``, ``span`` and ``walk``)."""

    def _resize(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """Resize / Upsample by constant scales that are 1 on the channel axis pass the channels through
        (FPN upsampling); target ``sizes`` hold the channel count and are refused."""
        g = self.graph
        node = g.nodes[i]
        where = f"{node.op_type} node {g.labels[i]}"
        if rank is None:
            raise Reject(f"{where} resizes a tensor of unknown rank")
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            raise Reject(f"{where} resizes to target sizes (they hold the channel count; not rewritten)")
        name = node.input[2] if node.op_type == "Resize" else (node.input[1] if len(node.input) > 1 else "")
        scales = g.const_value(name) if name else attr(node, "scales")
        if scales is None:
            raise Reject(f"{where} has computed scales")
        scales = [float(v) for v in np.asarray(scales).reshape(-1)]
        axes = attr(node, "axes")
        axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
        pos = rank + axis
        if len(scales) != len(axes) or (pos in axes and scales[axes.index(pos)] != 1.0):
            raise Reject(f"{where} scales the channel axis")
        self.walk(node.output[0], axis, rank, block)

    def _split(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """A Split on the channel axis with constant sizes: the output holding all of the group's channels
        carries them on (at their offset in it) and its size entry becomes kept + the others' channels; the
        other outputs hold other channels. A producer's whole output divided between parts raises
        :class:`SplitParts` (one group per part). A Split on another axis, or one whose sizes are computed,
        is refused with the reason."""
        g = self.graph
        node = g.nodes[i]
        where = f"Split node {g.labels[i]}"
        split_axis = int(attr(node, "axis", 0))
        if rank is None or (split_axis - rank if split_axis >= 0 else split_axis) != axis:
            raise Reject(f"{where} splits another axis than the channels'")
        sizes_name = node.input[1] if len(node.input) > 1 and node.input[1] else None
        sizes = g.const_value(sizes_name) if sizes_name else None
        if sizes is None:
            raise Reject(f"{where} has no constant split sizes (computed sizes, or num_outputs on a dimension of "
                         "unknown size, or a split attribute, are not rewritten)")
        if g.readers.get(sizes_name, []) != [i] or sizes_name in g.outputs:
            raise Reject(f"split sizes '{sizes_name}' of {where} are shared with other nodes")
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        total = self.size + self.span[1]
        if sum(sizes) != total:
            raise Reject(f"{where} splits {sum(sizes)} channels, not {total}")
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        lo, hi = self.span[0], self.span[0] + self.size
        inside = [k for k, (s, n) in enumerate(zip(starts, sizes)) if s <= lo and hi <= s + n]
        if not inside:
            if self.span == (0, 0):
                raise SplitParts(f"{where} divides the channels into parts of {sizes}", list(zip(starts, sizes)))
            raise Reject(f"{where} divides the group's channels between its outputs (parts of {sizes})")
        k = inside[0]
        self.shape_constants.append((sizes_name, k, sizes[k] - self.size, node.output[k], 1))
        self.walk(node.output[k], axis, rank, block, (lo - starts[k], sizes[k] - self.size))

    def _concat(self, i: int, value: str, axis: int, rank: int | None, block: int) -> None:
        """Concat along the channel axis (FPN / YOLO / DenseNet joins): the group's channels go on at an
        offset among the other inputs' channels, whose counts must be known (initializer or inferred
        shape); downstream vectors and consumers lose only the group's entries."""
        g = self.graph
        node = g.nodes[i]
        where = f"Concat node {g.labels[i]}"
        if rank is None or block != 1:
            raise Reject(f"{where} joins a tensor of unknown rank or flattened channels")
        pos = rank + axis
        if int(attr(node, "axis", 0)) % rank != pos:
            raise Reject(f"{where} joins along another axis than the channels (channels coupled across branches)")
        if list(node.input).count(value) != 1:
            raise Reject(f"{where} reads the channels twice")
        before = beside = 0
        seen = False
        for name in node.input:
            if name == value:
                seen = True
                continue
            dims = g.shape(name)
            if dims is None or len(dims) != rank or not dims[pos]:
                raise Reject(f"{where}: the channel count of its input '{name}' is unknown")
            beside += int(dims[pos])
            before += 0 if seen else int(dims[pos])
        offset, extra = self.span
        self.walk(node.output[0], axis, rank, block, (before + offset, beside + extra))

    def _move(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """Transpose / Squeeze / Unsqueeze with constant permutation or axes move the channel axis without
        reading the channel count (the layout changes of channel-last exports, e.g. tf2onnx's NHWC
        Transposes and Keras' ExpandDims/Squeeze around Conv2D): the walk goes on at the new position."""
        g = self.graph
        node = g.nodes[i]
        where = f"{node.op_type} node {g.labels[i]}"
        if rank is None:
            raise Reject(f"{where} moves axes of a tensor of unknown rank")
        pos = rank + axis
        if node.op_type == "Transpose":
            perm = attr(node, "perm")
            perm = list(range(rank))[::-1] if perm is None else [int(p) % rank for p in perm]
            if sorted(perm) != list(range(rank)):
                raise Reject(f"{where} has a permutation {perm} that does not match rank {rank}")
            self.walk(node.output[0], perm.index(pos) - rank, rank, block)
            return
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = g.const_value(node.input[1])
            if value is None:
                raise Reject(f"{where} has computed axes")
            axes = [int(a) for a in np.asarray(value).reshape(-1)]
        if not axes:
            raise Reject(f"{where} has no axes (which dimensions it removes depends on the shapes)")
        if node.op_type == "Squeeze":
            axes = sorted({int(a) % rank for a in axes})
            if pos in axes:
                raise Reject(f"{where} squeezes the channel axis")
            new_rank = rank - len(axes)
            new_pos = pos - sum(a < pos for a in axes)
        else:
            new_rank = rank + len(axes)
            axes = sorted({int(a) % new_rank for a in axes})
            new_pos = [d for d in range(new_rank) if d not in axes][pos]
        self.walk(node.output[0], new_pos - new_rank, new_rank, block)

    def _reduce(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """Reduce* over axes other than the channel axis passes the channels through (global pooling as
        exported by the dynamo exporter)."""
        g = self.graph
        node = g.nodes[i]
        where = f"{node.op_type} node {g.labels[i]}"
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = g.const_value(node.input[1])
            if value is None:
                raise Reject(f"{where} has computed axes")
            axes = [int(a) for a in np.asarray(value).reshape(-1)]
        if rank is None or not axes:
            raise Reject(f"{where} may reduce over the channel axis")
        axes = sorted({a % rank for a in axes})
        pos = rank + axis
        if pos in axes:
            raise Reject(f"{where} reduces over the channels")
        if int(attr(node, "keepdims", 1)):
            self.walk(node.output[0], axis, rank, block)
            return
        new_rank = rank - len(axes)
        new_pos = pos - sum(a < pos for a in axes)
        self.walk(node.output[0], new_pos - new_rank, new_rank, block)

    def _batch_entry(self, entry) -> bool:
        """A computed shape's first entry that removing channels leaves alone: a constant N >= 0, or axis 0
        of a tensor whose channels (if it is one of the group's) are not on axis 0."""
        if isinstance(entry, int):
            return entry >= 0
        tensor, k = entry
        if k != 0:
            return False
        if tensor not in self.tensors:
            return True
        dims = self.graph.shape(tensor)
        return dims is not None and len(dims) + self.tensors[tensor][0] != 0

    def _shape(self, i: int, value: str, axis: int, rank: int | None) -> None:
        """A Shape node ends the walk when nothing computed from it holds the channel count (it reads the
        batch size for a computed flatten, say); otherwise refused."""
        if rank is None:
            raise Reject(f"Shape node {self.graph.labels[i]} reads a tensor of unknown rank")
        reads_only_other_dims(self.graph, i, value, rank + axis)

    def _flatten(self, i: int, axis: int, rank: int | None, block: int) -> None:
        """Flatten(axis=1), or Reshape to [N, F], of an (N, C, ...) tensor: channel c becomes a block of
        prod(spatial) features. N is 0 (copy), -1 (inferred), a constant or the run-time batch size
        (``x.view(x.size(0), -1)`` with a dynamic batch); F is -1, or C x prod(spatial) spelled out in a
        constant of the target (``x.view(-1, 16 * 5 * 5)``), which then gets the kept count. The block is
        the known spatial size, or read off the consumer (in_features / C)."""
        g = self.graph
        node = g.nodes[i]
        where = f"{node.op_type} node {g.labels[i]}"
        if rank is None or axis != -(rank - 1):
            raise Reject(f"{where} flattens a tensor whose channel axis is not 1")
        dims = g.shape(node.input[0])
        spatial = int(np.prod(dims[2:])) if dims is not None and len(dims) == rank and all(dims[2:]) else 0
        if node.op_type == "Flatten":
            if int(attr(node, "axis", 1)) not in (1, 1 - rank):
                raise Reject(f"{where} does not flatten from axis 1")
        else:
            const = g.const_value(node.input[1])
            expr = shape_expr(g, node.input[1]) if const is None else [int(v) for v in np.asarray(const).reshape(-1)]
            if expr is None or len(expr) != 2 or int(attr(node, "allowzero", 0)):
                raise Reject(f"{where} has a target shape other than [N, -1] / [N, C*H*W]")
            first, features = expr
            total = self.size + self.span[1]
            if features == -1:
                ok = first != -1 and self._batch_entry(first)
            else:
                ok = (first == -1 or self._batch_entry(first)) and spatial > 0 and features == total * spatial
            if not ok:
                raise Reject(f"{where} has a target shape {expr} other than [N, -1] / [N, C*H*W]")
            if features != -1:
                source = const_source(g, node.input[1], 1)
                if source is None:
                    raise Reject(f"{where}: the constant that holds its {features} features is shared or computed")
                self.shape_constants.append((*source, self.span[1], node.output[0], spatial))
        self.walk(node.output[0], -1, 2, block if rank == 2 else spatial)  # block 0: known only at the consumer
