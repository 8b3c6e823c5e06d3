"""Tensor-manipulation operators onnx2torch lacks (ONNX operator specs).

* ScatterND-16/18 (replacing onnx2torch's, which refuses every ``reduction``): ``updates`` written
  at the index tuples of ``indices`` (last axis = tuple length k, negative entries count from the
  end) into the first k axes of ``data``; ``add``/``mul`` (18+: ``max``/``min``) combine with the
  existing value, one index tuple after another, so repeated tuples accumulate.
* Trilu-14: upper (``upper=1``, default) or lower triangle of the last two axes, diagonal offset ``k``.
* ScatterElements-11/13/16/18 (and Scatter-9, deprecated at 11): ``out[.., idx[..], ..] = updates``
  along ``axis``, negative indices counted from the end; ``reduction`` (16+) ``add``/``mul``
  (18+: ``max``/``min``) combines with the existing value (``scatter_reduce`` with ``include_self``).
* OneHot-9/11: ``values[1]`` where ``indices == position`` on a new ``axis`` of length ``depth``,
  ``values[0]`` elsewhere; negative indices count from ``depth`` (11), out-of-range give no hot entry.
* SpaceToDepth-1/13: ``[N, C, H, W] -> [N, C*b*b, H/b, W/b]``, channel ``(i*b + j)*C + c`` taking
  pixel ``(i, j)`` of each block (the transpose of DepthToSpace's DCR order).
* CumProd-26: cumulative product along ``axis`` with ``exclusive`` (shifted, starting at 1) and
  ``reverse``.
* CastLike-15/19/21/23: ``input`` cast to ``target_type``'s element type.
* Compress-9/11: the slices along ``axis`` (the flattened input without it) where ``condition`` is
  true; a ``condition`` shorter than the axis drops the rest.
* ReverseSequence-10: the first ``sequence_lens[b]`` steps of ``time_axis`` reversed for each
  ``batch_axis`` entry b.
* Det-11/22: determinant of the last two axes.
* CenterCropPad-18: each listed axis centre-cropped or zero-padded to ``shape``; an odd difference
  pads, or crops, one cell more at the end (the spec's function body).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, result

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


class OnnxTrilu(OnnxModule):
    def __init__(self, upper: bool):
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diagonal = int(k) if k is not None else 0
        return torch.triu(x, diagonal) if self.upper else torch.tril(x, diagonal)


class OnnxScatterElements(OnnxModule):
    def __init__(self, axis: int, reduction: str):
        super().__init__()
        self.axis, self.reduction = axis, reduction

    def forward(self, x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim()
        indices = indices.long()
        indices = torch.where(indices < 0, indices + x.shape[axis], indices)
        if self.reduction == "none":
            return torch.scatter(x, axis, indices, updates)
        return torch.scatter_reduce(x, axis, indices, updates, _REDUCE[self.reduction], include_self=True)


class OnnxScatterND(OnnxModule):
    def __init__(self, reduction: str):
        super().__init__()
        self.reduction = reduction

    def forward(self, x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        k = indices.shape[-1]
        lead = x.shape[:k]
        flat_x = x.reshape(-1, *x.shape[k:])
        idx = indices.long().reshape(-1, k)
        sizes = torch.tensor(lead, device=x.device, dtype=torch.long)
        idx = torch.where(idx < 0, idx + sizes, idx)
        strides = torch.ones(k, dtype=torch.long, device=x.device)
        for i in range(k - 2, -1, -1):
            strides[i] = strides[i + 1] * lead[i + 1]
        linear = (idx * strides).sum(dim=-1)
        flat_u = updates.reshape(-1, *x.shape[k:])
        if self.reduction == "none":
            out = flat_x.index_copy(0, linear, flat_u)
        else:
            index = linear.reshape(-1, *([1] * (flat_x.dim() - 1))).expand_as(flat_u)
            out = torch.scatter_reduce(flat_x, 0, index, flat_u, _REDUCE[self.reduction], include_self=True)
        return out.reshape(x.shape)


class OnnxOneHot(OnnxModule):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n = int(depth.reshape(-1)[0])
        idx = indices.long() if not indices.is_floating_point() else indices.trunc().long()
        idx = torch.where(idx < 0, idx + n, idx)
        hot = idx.unsqueeze(-1) == torch.arange(n, device=idx.device)
        out = torch.where(hot, values[1], values[0])
        axis = self.axis % out.dim()
        return out.movedim(-1, axis)


class OnnxSpaceToDepth(OnnxModule):
    def __init__(self, block: int):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.block
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)


class OnnxCumProd(OnnxModule):
    def __init__(self, exclusive: bool, reverse: bool):
        super().__init__()
        self.exclusive, self.reverse = exclusive, reverse

    def forward(self, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        dim = int(axis.reshape(-1)[0]) % x.dim()
        if self.reverse:
            x = torch.flip(x, dims=[dim])
        if self.exclusive:
            ones = torch.ones_like(x.narrow(dim, 0, 1))
            x = torch.cat([ones, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
        y = torch.cumprod(x, dim=dim)
        return torch.flip(y, dims=[dim]) if self.reverse else y


class OnnxCastLike(OnnxModule):
    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return x.to(target.dtype)


class OnnxCompress(OnnxModule):
    def __init__(self, axis: int | None):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            x, axis = x.reshape(-1), 0
        else:
            axis = self.axis % x.dim()
        keep = torch.nonzero(condition.reshape(-1)[: x.shape[axis]].bool()).reshape(-1)
        return torch.index_select(x, axis, keep)


class OnnxReverseSequence(OnnxModule):
    def __init__(self, batch_axis: int, time_axis: int):
        super().__init__()
        self.batch_axis, self.time_axis = batch_axis, time_axis

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = x.shape[self.time_axis]
        t = torch.arange(steps, device=x.device).unsqueeze(1)  # [T, 1]
        lens = lengths.long().unsqueeze(0)  # [1, B]
        index = torch.where(t < lens, lens - 1 - t, t)  # [T, B]
        if self.time_axis > self.batch_axis:
            index = index.t()
        shape = [1] * x.dim()
        shape[self.time_axis], shape[self.batch_axis] = steps, lengths.shape[0]
        index = index.reshape(shape).expand(x.shape)
        return torch.gather(x, self.time_axis, index)


class OnnxDet(OnnxModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.det(x)


class OnnxCenterCropPad(OnnxModule):
    def __init__(self, axes: list[int] | None):
        super().__init__()
        self.axes = axes

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        target = [int(s) for s in shape.reshape(-1).tolist()]
        axes = list(range(x.dim())) if not self.axes else [a % x.dim() for a in self.axes]
        for axis, size in zip(axes, target):
            current = x.shape[axis]
            if size < current:
                start = (current - size) // 2
                x = x.narrow(axis, start, size)
            elif size > current:
                before = (size - current) // 2
                pads = [0, 0] * (x.dim() - 1 - axis) + [before, size - current - before]
                x = F.pad(x, pads)
        return x


@converter("Trilu", 14)
def _trilu(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxTrilu(bool(attr(node, "upper", 1))))


@converter("ScatterElements", 11, 13, 16, 18)
def _scatter_elements(node: OnnxNode, graph: OnnxGraph):
    reduction = attr(node, "reduction", "none")
    if reduction != "none" and reduction not in _REDUCE:
        raise NotImplementedError(f"ScatterElements reduction={reduction} is not implemented")
    return result(node, OnnxScatterElements(int(attr(node, "axis", 0)), reduction))


@converter("ScatterND", 16, 18, override=True)
def _scatter_nd(node: OnnxNode, graph: OnnxGraph):
    reduction = attr(node, "reduction", "none")
    if reduction != "none" and reduction not in _REDUCE:
        raise NotImplementedError(f"ScatterND reduction={reduction} is not implemented")
    return result(node, OnnxScatterND(reduction))


@converter("Scatter", 9)
def _scatter(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxScatterElements(int(attr(node, "axis", 0)), "none"))


@converter("OneHot", 9, 11)
def _one_hot(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxOneHot(int(attr(node, "axis", -1))))


@converter("SpaceToDepth", 1, 13)
def _space_to_depth(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxSpaceToDepth(int(attr(node, "blocksize", 1))))


@converter("CumProd", 26)
def _cum_prod(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxCumProd(bool(attr(node, "exclusive", 0)), bool(attr(node, "reverse", 0))))


@converter("CastLike", 15, 19, 21, 23)
def _cast_like(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxCastLike())


@converter("Compress", 9, 11)
def _compress(node: OnnxNode, graph: OnnxGraph):
    axis = attr(node, "axis", None)
    return result(node, OnnxCompress(None if axis is None else int(axis)))


@converter("ReverseSequence", 10)
def _reverse_sequence(node: OnnxNode, graph: OnnxGraph):
    batch_axis, time_axis = int(attr(node, "batch_axis", 1)), int(attr(node, "time_axis", 0))
    if {batch_axis, time_axis} != {0, 1}:
        raise NotImplementedError("ReverseSequence with batch/time axes other than 0 and 1 is not defined")
    return result(node, OnnxReverseSequence(batch_axis, time_axis))


@converter("Det", 11, 22)
def _det(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxDet())


@converter("CenterCropPad", 18)
def _center_crop_pad(node: OnnxNode, graph: OnnxGraph):
    axes = attr(node, "axes", None)
    return result(node, OnnxCenterCropPad(None if not axes else [int(a) for a in axes]))
