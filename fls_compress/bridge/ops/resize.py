"""ONNX Resize-10/11/13/18/19 from the spec, replacing onnx2torch's converter.

onnx2torch's Resize maps onto ``torch.nn.functional.interpolate``, which has no equivalent of most
ONNX coordinate-transformation / rounding combinations: measured against onnxruntime, its ``nearest``
output is wrong for every ``coordinate_transformation_mode`` except ``asymmetric`` with ``floor``
(relative errors of 0.9-2.2 on random images), the mode exporters emit by default being
``half_pixel`` + ``round_prefer_floor``; at opset 10 its ``linear`` is wrong too (0.5-0.7). This module implements the spec instead, separably: for
each resized axis an interpolation matrix ``W[out, in]`` is built (float64) and applied along that
axis, which is exact, differentiable in the input and works for any rank.

Per output index ``y`` of an axis (input length ``n``, scale ``s`` = given scale, or ``out/n`` when
``sizes`` is given), the source coordinate ``x`` follows ``coordinate_transformation_mode``:
``half_pixel`` ``(y+0.5)/s-0.5``; ``half_pixel_symmetric`` the same shifted by
``n/2 * (1 - out/(s*n))``; ``pytorch_half_pixel`` that, or 0 for a length-1 output;
``align_corners`` ``y*(n-1)/(out-1)``; ``asymmetric`` ``y/s``; ``tf_crop_and_resize``
``roi_start*(n-1) + y*(roi_end-roi_start)*(n-1)/(out-1)`` with ``extrapolation_value`` outside
``[0, n-1]``. With ``k = ceil(x) - 1`` and ``r = x - k`` in ``(0, 1]``, the taps are ``k-m/2+1 ..
k+m/2`` (clamped to the edge, or dropped and renormalised with ``exclude_outside``) weighted by

* ``nearest``: the one tap ``nearest_mode`` picks (``round_prefer_floor``: k if r <= 0.5, ...);
* ``linear``: ``(1-r, r)``; with ``antialias`` and ``s < 1`` the triangle filter stretched by 1/s;
* ``cubic``: Keys' (1981) kernel with ``a = cubic_coeff_a`` (default -0.75), stretched the same way.

Known limit: ``half_pixel_symmetric`` with ``nearest_mode=floor``/``ceil`` where the exact source
coordinate is an integer may round to the neighbouring pixel of onnxruntime's choice (float32
rounding of the offset term; onnx.reference differs from onnxruntime there too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, present, result, spread


def _keys(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``t``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def source_coordinates(mode: str, out: int, n: int, scale: float, roi: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(source coordinate of each output index, whether it lies outside the input for tf_crop_and_resize).

    Computed in float32 in onnxruntime's order of operations: where the exact coordinate is an
    integer (e.g. ``(1 + 0.5) / 0.6 - 0.5``), float rounding decides floor/ceil of nearest modes, and
    the result must be the deployment runtime's."""
    f = np.float32
    y = np.arange(out, dtype=f)
    s, length, size = f(scale), f(n), f(out)
    outside = np.zeros(out, dtype=bool)
    if mode == "align_corners":
        x = np.zeros(out, dtype=f) if out == 1 else y * (length - f(1)) / (size - f(1))
    elif mode == "asymmetric":
        x = y / s
    elif mode == "tf_crop_and_resize":
        start, end = f(roi[0]), f(roi[1])
        if out == 1:
            x = np.full(out, (end - start) * (length - f(1)) / f(2), dtype=f)
        else:
            x = y * (end - start) * (length - f(1)) / (size - f(1))
        x = x + start * (length - f(1))
        outside = (x < 0) | (x > length - f(1))
    elif mode == "pytorch_half_pixel":
        x = np.full(out, -0.5, dtype=f) if out == 1 else (y + f(0.5)) / s - f(0.5)
    elif mode == "half_pixel":
        x = (y + f(0.5)) / s - f(0.5)
    elif mode == "half_pixel_symmetric":
        adjustment = size / (s * length)
        offset = (length / f(2)) * (f(1) - adjustment)
        x = offset + (y + f(0.5)) / s - f(0.5)
    else:
        raise NotImplementedError(f"Resize coordinate_transformation_mode={mode} is not implemented")
    return x.astype(np.float64), outside


def interpolation_matrix(n: int, out: int, scale: float, *, mode: str, coordinate_mode: str, nearest_mode: str,
                         cubic_a: float, exclude_outside: bool, antialias: bool,
                         roi: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(W[out, n], outside[out])`` of one axis (see the module docstring)."""
    x, outside = source_coordinates(coordinate_mode, out, n, scale, roi)
    k = np.ceil(x) - 1
    r = x - k  # in (0, 1]
    stretch = min(scale, 1.0) if antialias and mode != "nearest" else 1.0
    if mode == "nearest":
        offsets = np.array([0.0, 1.0])
        if nearest_mode == "simple":  # Resize-10: floor when upsampling, ceil when downsampling (onnxruntime)
            nearest_mode = "ceil" if scale < 1 else "floor"
        pick_high = {"round_prefer_floor": r > 0.5, "round_prefer_ceil": r >= 0.5, "floor": r >= 1.0,
                     "ceil": np.ones_like(r, dtype=bool)}.get(nearest_mode)
        if pick_high is None:
            raise NotImplementedError(f"Resize nearest_mode={nearest_mode} is not implemented")
        coeffs = np.stack([~pick_high, pick_high], axis=1).astype(np.float64)
    else:
        reach = 1.0 if mode == "linear" else 2.0
        start = math.floor(-reach / stretch) + 1
        offsets = np.arange(start, 2 - start, dtype=np.float64)  # footprint 2 - 2*start taps
        dist = (offsets[None, :] - r[:, None]) * stretch
        coeffs = np.clip(1 - np.abs(dist), 0, None) if mode == "linear" else _keys(dist, cubic_a)
        if stretch < 1.0:
            coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
    taps = k[:, None] + offsets[None, :]
    if exclude_outside and mode != "nearest":
        inside = (taps >= 0) & (taps <= n - 1)
        coeffs = np.where(inside, coeffs, 0.0)
        coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
    index = np.clip(taps, 0, n - 1).astype(np.int64)
    matrix = np.zeros((out, n), dtype=np.float64)
    rows = np.repeat(np.arange(out), index.shape[1])
    np.add.at(matrix, (rows, index.reshape(-1)), coeffs.reshape(-1))
    matrix[outside] = 0.0
    return matrix, outside


class OnnxResize(OnnxModule):
    def __init__(self, flags: tuple[bool, ...], axes: list[int] | None, extrapolation: float, **options):
        super().__init__()
        self.flags, self.axes, self.extrapolation, self.options = flags, axes, extrapolation, options

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x, roi, scales, sizes = spread(args, self.flags)
        rank = x.dim()
        axes = list(range(rank)) if not self.axes else [a % rank for a in self.axes]
        full_scales = [1.0] * rank
        full_sizes = list(x.shape)
        roi_pairs = [(0.0, 1.0)] * rank
        if roi is not None and roi.numel():
            values = roi.reshape(-1).tolist()
            half = len(values) // 2
            for i, axis in enumerate(axes):
                roi_pairs[axis] = (values[i], values[half + i])
        if sizes is not None and sizes.numel():
            for axis, size in zip(axes, sizes.reshape(-1).tolist()):
                full_sizes[axis] = int(size)
                full_scales[axis] = int(size) / x.shape[axis]
        elif scales is not None and scales.numel():
            for axis, scale in zip(axes, scales.reshape(-1).tolist()):
                full_scales[axis] = float(scale)
                full_sizes[axis] = int(math.floor(np.float32(scale) * np.float32(x.shape[axis])))  # float32, as onnxruntime
        else:
            raise RuntimeError("Resize needs scales or sizes")
        outside_any = None
        for axis in range(rank):
            n, out, scale = x.shape[axis], full_sizes[axis], full_scales[axis]
            if out == n and scale == 1.0 and self.options["coordinate_mode"] != "tf_crop_and_resize":
                continue
            matrix, outside = interpolation_matrix(n, out, scale, roi=roi_pairs[axis], **self.options)
            weights = torch.as_tensor(matrix, dtype=x.dtype, device=x.device)
            x = torch.movedim(torch.matmul(torch.movedim(x, axis, -1), weights.t()), -1, axis)
            if outside.any():
                shape = [1] * rank
                shape[axis] = out
                mask = torch.as_tensor(outside, device=x.device).reshape(shape)
                outside_any = mask if outside_any is None else outside_any | mask
        if outside_any is not None:
            x = torch.where(outside_any, torch.full((), self.extrapolation, dtype=x.dtype, device=x.device), x)
        return x


def _resize(node: OnnxNode, graph: OnnxGraph):
    names, flags = present(node, 4)
    mode = attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear", "cubic"):
        raise NotImplementedError(f"Resize mode={mode} is not implemented")
    if attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize keep_aspect_ratio_policy other than stretch is not implemented")
    axes = attr(node, "axes", None)
    module = OnnxResize(
        flags, [int(a) for a in axes] if axes else None, float(attr(node, "extrapolation_value", 0.0)),
        mode=mode,
        coordinate_mode=attr(node, "coordinate_transformation_mode", "half_pixel"),
        nearest_mode=attr(node, "nearest_mode", "round_prefer_floor"),
        cubic_a=float(attr(node, "cubic_coeff_a", -0.75)),
        exclude_outside=bool(attr(node, "exclude_outside", 0)),
        antialias=bool(attr(node, "antialias", 0)),
    )
    return result(node, module, names)


converter("Resize", 11, 13, 18, 19, override=True)(_resize)


@converter("Resize", 10, override=True)
def _resize_10(node: OnnxNode, graph: OnnxGraph):
    """Resize-10 (inputs X, scales; attribute mode): asymmetric coordinates, and for ``nearest`` the
    input cell ``floor(x)`` when upsampling, ``ceil(x)`` when downsampling, as onnxruntime runs it."""
    mode = attr(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise NotImplementedError(f"Resize-10 mode={mode} is not implemented")
    module = OnnxResize((True, False, True, False), None, 0.0, mode=mode, coordinate_mode="asymmetric",
                        nearest_mode="simple", cubic_a=-0.75, exclude_outside=False, antialias=False)
    return result(node, module, list(node.input_values[:2]))
