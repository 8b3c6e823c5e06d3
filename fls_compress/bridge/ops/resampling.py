"""Resampling operators onnx2torch lacks (ONNX operator specs).

* Upsample-7/9 (deprecated by Resize): output size ``floor(in * scale)`` per axis; ``nearest``
  reads input cell ``floor(out / scale)``; ``linear`` interpolates at ``out / scale`` (asymmetric
  coordinates), clamped to the last cell, separably over every scaled axis. Scales are an attribute
  (7) or a constant input (9).
* GridSample-16/20/22 (Jaderberg et al. 2015): ``torch.nn.functional.grid_sample`` with the same
  ``mode`` (16: bilinear/nearest/bicubic; 20+: linear/nearest/cubic; cubic only for 2-D images, as
  in torch), ``padding_mode`` and ``align_corners``.
* AffineGrid-20: ``torch.nn.functional.affine_grid`` (2-D and 3-D), ``size`` read at run time.
* Col2Im-18: ``torch.nn.functional.fold`` for 2-D images with symmetric ``pads``.
* DeformConv-19/22 (Dai et al. 2017; Zhu et al. 2019, modulated), 2-D: for each kernel tap k and
  output cell, the input is sampled bilinearly at ``o*stride - pad_begin + k*dilation + offset``
  (zero outside the input; offsets ``(dy, dx)`` per tap and offset group), multiplied by ``mask``
  (default 1), and contracted with ``W`` per channel group, plus ``B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import get_const_value

from ._common import OnnxModule, attr, const_ints, converter, present, result, spread


def _scaled_axis(x: torch.Tensor, axis: int, scale: float, linear: bool) -> torch.Tensor:
    size = x.shape[axis]
    out = int(math.floor(size * scale))
    coord = torch.arange(out, device=x.device, dtype=torch.float64) / scale
    if not linear:
        index = torch.clamp(torch.floor(coord).long(), max=size - 1)
        return torch.index_select(x, axis, index)
    coord = torch.clamp(coord, max=size - 1)
    low = torch.floor(coord).long()
    high = torch.clamp(low + 1, max=size - 1)
    frac = (coord - low).to(x.dtype)
    shape = [1] * x.dim()
    shape[axis] = out
    frac = frac.reshape(shape)
    return torch.index_select(x, axis, low) * (1 - frac) + torch.index_select(x, axis, high) * frac


class OnnxUpsample(OnnxModule):
    def __init__(self, scales: list[float], linear: bool):
        super().__init__()
        self.scales, self.linear = scales, linear

    def forward(self, x: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        for axis, scale in enumerate(self.scales):
            if scale != 1.0:
                x = _scaled_axis(x, axis, scale, self.linear)
        return x


class OnnxGridSample(OnnxModule):
    def __init__(self, mode: str, padding_mode: str, align_corners: bool):
        super().__init__()
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners

    def forward(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners)


class OnnxAffineGrid(OnnxModule):
    def __init__(self, align_corners: bool):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, theta: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        return F.affine_grid(theta, [int(s) for s in size.tolist()], align_corners=self.align_corners)


class OnnxCol2Im(OnnxModule):
    def __init__(self, block: list[int], image: list[int], dilations: list[int], pads: list[int], strides: list[int]):
        super().__init__()
        self.block, self.image, self.dilations, self.pads, self.strides = block, image, dilations, pads, strides

    def forward(self, x: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
        return F.fold(x, self.image, self.block, dilation=self.dilations, padding=self.pads, stride=self.strides)


class OnnxDeformConv(OnnxModule):
    def __init__(self, flags, strides, pads, dilations, group: int, offset_group: int):
        super().__init__()
        self.flags, self.strides, self.pads, self.dilations = flags, strides, pads, dilations
        self.group, self.offset_group = group, offset_group

    def _sample(self, x: torch.Tensor, y_pos: torch.Tensor, x_pos: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of ``x`` [N, C, H, W] at pixel positions [N, oH, oW], zero outside."""
        height, width = x.shape[-2:]
        y0, x0 = torch.floor(y_pos), torch.floor(x_pos)
        out = x.new_zeros(x.shape[0], x.shape[1], *y_pos.shape[1:])
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = y0 + dy, x0 + dx
                weight = (1 - torch.abs(y_pos - yy)) * (1 - torch.abs(x_pos - xx))
                inside = (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
                index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).long().reshape(x.shape[0], 1, -1)
                values = torch.gather(flat, 2, index.expand(-1, x.shape[1], -1)).reshape(out.shape)
                out = out + values * (weight * inside).unsqueeze(1)
        return out

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x, weight, offset, bias, mask = spread(args, self.flags)
        n, c = x.shape[:2]
        oc, _, kh, kw = weight.shape
        oh, ow = offset.shape[-2:]
        taps = kh * kw
        offset = offset.reshape(n, self.offset_group, taps, 2, oh, ow)
        base_y = (torch.arange(oh, device=x.device, dtype=x.dtype) * self.strides[0] - self.pads[0]).reshape(1, oh, 1)
        base_x = (torch.arange(ow, device=x.device, dtype=x.dtype) * self.strides[1] - self.pads[1]).reshape(1, 1, ow)
        per_group = c // self.offset_group
        columns = []
        for g in range(self.offset_group):
            xg = x[:, g * per_group : (g + 1) * per_group]
            taps_g = []
            for k in range(taps):
                i, j = divmod(k, kw)
                y_pos = base_y + i * self.dilations[0] + offset[:, g, k, 0]
                x_pos = base_x + j * self.dilations[1] + offset[:, g, k, 1]
                sampled = self._sample(xg, y_pos, x_pos)
                if mask is not None:
                    sampled = sampled * mask.reshape(n, self.offset_group, taps, oh, ow)[:, g, k].unsqueeze(1)
                taps_g.append(sampled)
            columns.append(torch.stack(taps_g, dim=2))  # [N, C/G_off, K, oH, oW]
        cols = torch.cat(columns, dim=1)  # [N, C, K, oH, oW]
        cin, cout = c // self.group, oc // self.group
        outs = [torch.einsum("nckhw,ock->nohw", cols[:, g * cin : (g + 1) * cin],
                             weight[g * cout : (g + 1) * cout].reshape(cout, cin, taps)) for g in range(self.group)]
        y = torch.cat(outs, dim=1)
        return y + bias.reshape(1, -1, 1, 1) if bias is not None else y


@converter("DeformConv", 19, 22)
def _deform_conv(node: OnnxNode, graph: OnnxGraph):
    names, flags = present(node, 5)
    kernel = attr(node, "kernel_shape", None)
    if kernel is not None and len(kernel) != 2:
        raise NotImplementedError("DeformConv is implemented for 2-D images only")
    module = OnnxDeformConv(flags, attr(node, "strides", None) or [1, 1], (attr(node, "pads", None) or [0, 0, 0, 0])[:2],
                            attr(node, "dilations", None) or [1, 1], int(attr(node, "group", 1)), int(attr(node, "offset_group", 1)))
    return result(node, module, names)


def _upsample(node: OnnxNode, graph: OnnxGraph, scales: list[float]):
    mode = attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise NotImplementedError(f"Upsample mode={mode} is not implemented")
    return result(node, OnnxUpsample([float(s) for s in scales], mode != "nearest"), [node.input_values[0]])


@converter("Upsample", 7)
def _upsample_7(node: OnnxNode, graph: OnnxGraph):
    return _upsample(node, graph, list(attr(node, "scales", [])))


@converter("Upsample", 9)
def _upsample_9(node: OnnxNode, graph: OnnxGraph):
    try:
        scales = torch.as_tensor(get_const_value(node.input_values[1], graph)).reshape(-1).tolist()
    except KeyError as exc:
        raise NotImplementedError("Upsample with computed scales is not implemented") from exc
    return _upsample(node, graph, scales)


_GRID_MODES = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic", "cubic": "bicubic"}


@converter("GridSample", 16, 20, 22)
def _grid_sample(node: OnnxNode, graph: OnnxGraph):
    mode = attr(node, "mode", "bilinear")
    padding = attr(node, "padding_mode", "zeros")
    if mode not in _GRID_MODES or padding not in ("zeros", "border", "reflection"):
        raise NotImplementedError(f"GridSample mode={mode} padding_mode={padding} is not implemented")
    return result(node, OnnxGridSample(_GRID_MODES[mode], padding, bool(attr(node, "align_corners", 0))))


@converter("AffineGrid", 20)
def _affine_grid(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxAffineGrid(bool(attr(node, "align_corners", 0))))


@converter("Col2Im", 18)
def _col2im(node: OnnxNode, graph: OnnxGraph):
    image = const_ints(node.input_values[1], graph, "Col2Im image_shape")
    block = const_ints(node.input_values[2], graph, "Col2Im block_shape")
    if len(image) != 2:
        raise NotImplementedError("Col2Im is implemented for 2-D images only")
    pads = attr(node, "pads", None) or [0, 0, 0, 0]
    if pads[:2] != pads[2:]:
        raise NotImplementedError("Col2Im with asymmetric pads is not implemented")
    module = OnnxCol2Im(block, image, attr(node, "dilations", None) or [1, 1], pads[:2], attr(node, "strides", None) or [1, 1])
    return result(node, module, [node.input_values[0]])
