"""Pooling operators onnx2torch lacks (ONNX operator specs).

* GlobalMaxPool-1/22: maximum over every spatial axis (2..), kept as size-1 axes.
* GlobalLpPool-2/22: ``(sum |x|^p)^(1/p)`` over every spatial axis, ``p`` default 2.
* LpPool-11/18/22: the same norm over sliding windows with ``kernel_shape``, ``strides``, ``pads``,
  ``auto_pad`` and (18+) ``dilations`` and ``ceil_mode``. Padding contributes zeros, which leave the
  sum unchanged, so windows are taken from the zero-padded input with ``Tensor.unfold`` for any number
  of spatial axes. Output sizes follow the ONNX pooling formulas: explicit pads
  ``floor((in + pb + pe - ((k-1)d+1)) / s) + 1`` (ceil with ``ceil_mode``, dropping a last window
  that would start in the end padding, as torch and onnxruntime do); ``SAME_*``: ``ceil(in / s)`` with the
  total padding split so the extra cell goes at the end (UPPER) or the start (LOWER); ``VALID``: no padding.
* MaxUnpool-9/11/22: zeros of the unpooled shape (``output_shape`` when given, else
  ``(in - 1) * stride - pad_begin - pad_end + kernel`` per spatial axis) with ``X`` written at the
  indices ``I`` MaxPool returns, which are flat positions in the whole (N, C, spatial) tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, result


class OnnxGlobalMaxPool(OnnxModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        return torch.amax(x, dim=dims, keepdim=True) if dims else x


class OnnxGlobalLpPool(OnnxModule):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        return torch.sum(torch.abs(x) ** self.p, dim=dims, keepdim=True) ** (1.0 / self.p)


def pool_geometry(
    size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int, auto_pad: str, ceil_mode: bool
) -> tuple[int, int, int]:
    """(output length, padding before, padding after, possibly negative = crop) of one pooled axis."""
    span = (kernel - 1) * dilation + 1
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + span - size, 0)
        small, large = total // 2, total - total // 2
        pad_begin, pad_end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pad_begin = pad_end = 0
        out = math.ceil((size - span + 1) / stride)
    else:
        room = size + pad_begin + pad_end - span
        out = (math.ceil(room / stride) if ceil_mode else room // stride) + 1
        if ceil_mode and (out - 1) * stride >= size + pad_begin:
            out -= 1
    needed = (out - 1) * stride + span
    return out, pad_begin, needed - size - pad_begin


class OnnxLpPool(OnnxModule):
    def __init__(self, kernel, strides, dilations, pads, auto_pad: str, ceil_mode: bool, p: float):
        super().__init__()
        self.kernel, self.strides, self.dilations, self.pads = list(kernel), list(strides), list(dilations), list(pads)
        self.auto_pad, self.ceil_mode, self.p = auto_pad, ceil_mode, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.kernel)
        torch_pads: list[int] = []
        geometry = []
        for i in range(n):
            geometry.append(pool_geometry(x.shape[2 + i], self.kernel[i], self.strides[i], self.dilations[i],
                                          self.pads[i], self.pads[n + i], self.auto_pad, self.ceil_mode))
        for out, begin, end in reversed(geometry):
            torch_pads.extend([begin, end])
        y = F.pad(torch.abs(x) ** self.p, torch_pads)  # negative pads crop cells no window reads
        for i in range(n):
            span = (self.kernel[i] - 1) * self.dilations[i] + 1
            y = y.unfold(2 + i, span, self.strides[i])
        window = tuple(slice(None, None, d) for d in self.dilations)
        y = y[(Ellipsis, *window)]
        return torch.sum(y, dim=tuple(range(-n, 0))) ** (1.0 / self.p)


class OnnxMaxUnpool(OnnxModule):
    def __init__(self, kernel, strides, pads, has_shape: bool):
        super().__init__()
        self.kernel, self.strides, self.pads, self.has_shape = list(kernel), list(strides), list(pads), has_shape

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_shape: torch.Tensor | None = None) -> torch.Tensor:
        n = len(self.kernel)
        if output_shape is not None:
            shape = [int(d) for d in output_shape.reshape(-1).tolist()]
        else:
            shape = list(x.shape[:2]) + [
                (x.shape[2 + i] - 1) * self.strides[i] - self.pads[i] - self.pads[n + i] + self.kernel[i] for i in range(n)]
        out = x.new_zeros(math.prod(shape))
        out = out.scatter(0, indices.reshape(-1).long(), x.reshape(-1))
        return out.reshape(shape)


@converter("MaxUnpool", 9, 11, 22)
def _max_unpool(node: OnnxNode, graph: OnnxGraph):
    kernel = list(attr(node, "kernel_shape", []))
    n = len(kernel)
    module = OnnxMaxUnpool(kernel, attr(node, "strides", None) or [1] * n, attr(node, "pads", None) or [0] * (2 * n),
                           len([v for v in node.input_values if v]) > 2)
    return result(node, module)


@converter("GlobalMaxPool", 1, 22)
def _global_max_pool(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxGlobalMaxPool())


@converter("GlobalLpPool", 2, 22)
def _global_lp_pool(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxGlobalLpPool(float(attr(node, "p", 2))))


@converter("LpPool", 11, 18, 22)
def _lp_pool(node: OnnxNode, graph: OnnxGraph):
    kernel = list(attr(node, "kernel_shape", []))
    if not kernel:
        raise NotImplementedError("LpPool without kernel_shape is not implemented")
    n = len(kernel)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    module = OnnxLpPool(
        kernel,
        attr(node, "strides", None) or [1] * n,
        attr(node, "dilations", None) or [1] * n,
        attr(node, "pads", None) or [0] * (2 * n),
        auto_pad,
        bool(attr(node, "ceil_mode", 0)),
        float(attr(node, "p", 2)),
    )
    return result(node, module)
