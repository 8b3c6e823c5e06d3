"""Signal-processing operators (ONNX operator specs, opset 17+), complex values as ``[..., 2]`` pairs.

* HannWindow / HammingWindow / BlackmanWindow-17: ``a0 - a1 cos(2 pi n / N) + a2 cos(4 pi n / N)``
  with ``N = size`` (``periodic=1``, default) or ``size - 1``; Hann ``(0.5, 0.5, 0)``, Hamming
  ``(25/46, 21/46, 0)``, Blackman ``(0.42, 0.5, 0.08)`` (Harris 1978); ``output_datatype`` sets the type.
* DFT-17/20: ``torch.fft.fft`` / ``ifft`` (the inverse scaled by 1/N, as the spec) along ``axis``
  (17: attribute, default 1; 20: input, default -2) of a real (last axis 1) or complex (last axis 2)
  signal, zero-padded or truncated to ``dft_length``; ``onesided=1`` keeps the first ``N//2 + 1``
  bins of a forward transform (the one-sided inverse, IRFFT, is refused).
* STFT-17: frames of ``frame_length`` every ``frame_step`` samples of ``[batch, length, 1|2]``
  (``floor((length - frame_length) / frame_step) + 1`` frames), multiplied by ``window`` (default
  all ones), each transformed as above; ``onesided`` (default 1) keeps ``frame_length//2 + 1`` bins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, present, result, spread

_WINDOWS = {"HannWindow": (0.5, 0.5, 0.0), "HammingWindow": (25 / 46, 21 / 46, 0.0), "BlackmanWindow": (0.42, 0.5, 0.08)}


def _torch_dtype(onnx_type: int) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] == 1:
        return torch.complex(x[..., 0], torch.zeros_like(x[..., 0]))
    return torch.complex(x[..., 0], x[..., 1])


class OnnxWindow(OnnxModule):
    def __init__(self, coefficients: tuple[float, float, float], periodic: bool, dtype: torch.dtype):
        super().__init__()
        self.coefficients, self.periodic, self.dtype = coefficients, periodic, dtype

    def forward(self, size: torch.Tensor) -> torch.Tensor:
        n = int(size.reshape(-1)[0])
        length = n if self.periodic else n - 1
        k = torch.arange(n, dtype=torch.float64)
        a0, a1, a2 = self.coefficients
        y = a0 - a1 * torch.cos(2 * math.pi * k / length) + a2 * torch.cos(4 * math.pi * k / length)
        return y.to(self.dtype)


class OnnxDFT(OnnxModule):
    def __init__(self, flags: tuple[bool, ...], axis: int | None, inverse: bool, onesided: bool):
        super().__init__()
        self.flags, self.axis, self.inverse, self.onesided = flags, axis, inverse, onesided

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x, length, axis_input = spread(args, self.flags)
        axis = int(axis_input.reshape(-1)[0]) if axis_input is not None else self.axis
        axis = axis % x.dim()
        signal = _as_complex(x)
        n = int(length.reshape(-1)[0]) if length is not None else signal.shape[axis]
        out = (torch.fft.ifft if self.inverse else torch.fft.fft)(signal, n=n, dim=axis)
        if self.onesided:
            out = out.narrow(axis, 0, n // 2 + 1)
        return torch.view_as_real(out).to(x.dtype)


class OnnxSTFT(OnnxModule):
    def __init__(self, flags: tuple[bool, ...], onesided: bool):
        super().__init__()
        self.flags, self.onesided = flags, onesided

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        x, step, window, frame_length = spread(args, self.flags)
        signal = _as_complex(x)  # [batch, length]
        length = int(frame_length.reshape(-1)[0]) if frame_length is not None else (
            window.shape[0] if window is not None else signal.shape[1])
        frames = signal.unfold(1, length, int(step.reshape(-1)[0]))  # [batch, frames, length]
        if window is not None:
            frames = frames * window.to(frames.real.dtype)
        out = torch.fft.fft(frames, dim=-1)
        if self.onesided:
            out = out[..., : length // 2 + 1]
        return torch.view_as_real(out).to(x.dtype)


def _window(op: str):
    def convert(node: OnnxNode, graph: OnnxGraph):
        dtype = _torch_dtype(int(attr(node, "output_datatype", 1)))
        return result(node, OnnxWindow(_WINDOWS[op], bool(attr(node, "periodic", 1)), dtype))

    return convert


for _op in _WINDOWS:
    converter(_op, 17)(_window(_op))


def _dft(node: OnnxNode, graph: OnnxGraph, axis: int | None):
    names, flags = present(node, 3)
    inverse, onesided = bool(attr(node, "inverse", 0)), bool(attr(node, "onesided", 0))
    if inverse and onesided:
        raise NotImplementedError("DFT with inverse=1 and onesided=1 (IRFFT) is not implemented")
    return result(node, OnnxDFT(flags, axis, inverse, onesided), names)


@converter("DFT", 17)
def _dft_17(node: OnnxNode, graph: OnnxGraph):
    return _dft(node, graph, int(attr(node, "axis", 1)))


@converter("DFT", 20)
def _dft_20(node: OnnxNode, graph: OnnxGraph):
    return _dft(node, graph, -2)


@converter("STFT", 17)
def _stft(node: OnnxNode, graph: OnnxGraph):
    names, flags = present(node, 4)
    return result(node, OnnxSTFT(flags, bool(attr(node, "onesided", 1))), names)
