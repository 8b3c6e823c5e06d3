"""Uniform integer quantisation grids for weight matrices in the (out, in) matrix view.

A grid maps a weight w of row r, column j to an integer code and back (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1; the ONNX
``DequantizeLinear`` operator):

    code = clamp(round(w / s) + z, qmin, qmax),      value = (code - z) * s   (computed in float32)

* bits 8 or 4; ``symmetric=True``: signed codes, z = 0, s = max|w| / (2^(b-1) - 1);
  ``symmetric=False``: unsigned codes in [0, 2^b - 1], s = (max - min) / (2^b - 1), z = round(-min / s),
  with the range widened to contain 0 so that 0 (a pruned weight) is exactly representable;
* granularity ``"tensor"`` (one s, z), ``"channel"`` (one per output row of the matrix view) or
  ``"block:g"`` (one per row and each run of g consecutive input columns; when g does not divide the
  columns the last block of a row is shorter, as ONNX blocked DequantizeLinear takes ceil(in / g) scales).

Scales are float32 and values are computed exactly as ``DequantizeLinear`` computes them, so
``dequantize(codes)`` equals ``quantize(w)`` bit for bit in float32 and the exported model reproduces
the weights the compression used. Grids are fitted once on the weights given (for GPTQ: the original
weights before the sweep, GPTQ's ``static_groups``), which also keeps groups fixed under act-order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidOptionError

BITS = (4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What grid to use: bit width, symmetric or not, granularity."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # "tensor" | "channel" | "block:<g>"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise InvalidOptionError(f"bits must be 4 or 8, got {self.bits!r}")
        self.block  # validates the granularity string

    @property
    def block(self) -> int | None:
        """g for ``block:g``, else None."""
        g = self.granularity
        if g in ("tensor", "channel"):
            return None
        if g.startswith("block:"):
            try:
                size = int(g.split(":", 1)[1])
            except ValueError:
                size = 0
            if size >= 1:
                return size
        raise InvalidOptionError(f"granularity must be 'tensor', 'channel' or 'block:<g>' (g >= 1), got {g!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass
class Grid:
    """A fitted grid for one (out, in) matrix: ``scale``/``zero_point`` are (out, n_groups); column j
    uses group j // group_size (``group_size`` = in for tensor/channel)."""

    spec: QuantSpec
    scale: np.ndarray  # float32 (out, n_groups)
    zero_point: np.ndarray  # int32 (out, n_groups)
    group_size: int

    @classmethod
    def fit(cls, w: np.ndarray | torch.Tensor, spec: QuantSpec) -> "Grid":
        """Min/max grid of ``w`` (out, in) at the spec's granularity."""
        w = np.asarray(w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else w, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError("Grid.fit expects a 2-D (out, in) matrix")
        rows, cols = w.shape
        g = spec.block
        if spec.granularity == "tensor":
            lo, hi = np.full((rows, 1), w.min(initial=0.0)), np.full((rows, 1), w.max(initial=0.0))
            size = cols
        else:
            size = cols if g is None else g
            groups = -(-cols // size)  # a last, shorter block when g does not divide the columns
            padded = np.concatenate([w, np.zeros((rows, groups * size - cols))], axis=1) if groups * size > cols else w
            parts = padded.reshape(rows, groups, size)
            lo, hi = parts.min(axis=2), parts.max(axis=2)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # 0 must be on the grid
        if spec.symmetric:
            scale = np.maximum(np.abs(lo), np.abs(hi)) / spec.qmax
            zero = np.zeros_like(scale, dtype=np.int32)
        else:
            scale = (hi - lo) / (spec.qmax - spec.qmin)
            zero = None
        scale = scale.astype(np.float32)
        tiny = np.finfo(np.float32).tiny
        scale = np.where(scale > tiny, scale, np.float32(1.0)).astype(np.float32)  # all-zero group
        if zero is None:
            zero = np.clip(np.round(-lo / scale.astype(np.float64)), spec.qmin, spec.qmax).astype(np.int32)
        return cls(spec, scale, zero, size)

    # --------------------------------------------------------------------------------------------
    def _expand(self, a: np.ndarray, cols: int) -> np.ndarray:
        """Per-group values as an array broadcasting against (out, cols): one group is a column vector
        (no (out, cols) copy), more are repeated over their columns."""
        if a.shape[1] != -(-cols // self.group_size):
            raise ValueError(f"grid covers {a.shape[1] * self.group_size} columns, got {cols}")
        return a if a.shape[1] == 1 else np.repeat(a, self.group_size, axis=1)[:, :cols]

    def codes(self, w: np.ndarray) -> np.ndarray:
        """Integer codes (int32) of a full (out, in) matrix."""
        w = np.asarray(w, dtype=np.float64)
        s = self._expand(self.scale, w.shape[1]).astype(np.float64)
        z = self._expand(self.zero_point, w.shape[1])
        return np.clip(np.round(w / s) + z, self.spec.qmin, self.spec.qmax).astype(np.int32)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """float32 values (code - z) * s, exactly as ONNX DequantizeLinear computes them."""
        s = self._expand(self.scale, codes.shape[1])
        z = self._expand(self.zero_point, codes.shape[1])
        return (codes.astype(np.int32) - z).astype(np.float32) * s

    def quantize(self, w: np.ndarray) -> np.ndarray:
        """Nearest grid values (float32) of a full matrix: dequantize(codes(w))."""
        return self.dequantize(self.codes(w))

    def column_quantizer(self, order: torch.Tensor | None = None):
        """``quantize(column, j)`` for :func:`~fls_compress.pruning.sweep.obs_sweep`; sweep column j is
        original column ``order[j]`` (``None``: the identity)."""
        scale64 = torch.from_numpy(self.scale.astype(np.float64))
        scale32 = torch.from_numpy(self.scale)
        zero = torch.from_numpy(self.zero_point.astype(np.int64))
        qmin, qmax = self.spec.qmin, self.spec.qmax

        def quantize(col: torch.Tensor, j: int) -> torch.Tensor:
            src = int(order[j]) if order is not None else j
            gi = src // self.group_size
            s64, z = scale64[:, gi].to(col.device), zero[:, gi].to(col.device)
            code = torch.clamp(torch.round(col.to(torch.float64) / s64) + z, qmin, qmax).to(torch.int64)
            value = (code - z).to(torch.float32) * scale32[:, gi].to(col.device)  # float32, as DequantizeLinear
            return value.to(col.dtype)

        return quantize
