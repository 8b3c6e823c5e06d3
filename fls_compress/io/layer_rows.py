"""Rows of a layer's input X and their second moments, streamed.

:func:`layer_input_rows` turns an activation captured by :mod:`fls_compress.io.activations` into rows
of X in the (out, in) matrix view: MatMul ``X @ W`` -> X flattened to (-1, in); ``W @ X`` -> the last
two axes swapped; Gemm -> A (A^T when ``transA=1``); Conv (1-D/2-D) -> im2col
(``torch.nn.functional.unfold``) with the node's kernel_shape / strides / pads / dilations / auto_pad,
one block per group (``group > 1`` and depthwise included). :class:`RowStatistics` accumulates X^T X
per group (float64) chunk by chunk, never holding X whole.

Row subsampling. A convolution on a large feature map has N * H_out * W_out rows (a 640x640 detector:
millions), and X^T X costs rows * in^2. :class:`RowStatistics` keeps at most ``max_rows`` rows per
layer: a seeded uniform random subset (without replacement) of the row stream, chosen once the stream
length is known, so 2 X_S^T X_S / |S| is an unbiased estimate of H = 2 X^T X / n. The rows actually
used and available are reported (``rows_used``, ``rows_total``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from .activations import LayerUse, conv_groups
from .onnx_model import PrunableSite

#: Default cap on the rows of X per layer (all samples and uses together); only large feature maps hit it.
DEFAULT_MAX_ROWS = 65536
_ROW_CHUNK_FLOATS = 2e7  # elements of X processed at once


def _conv_geometry(site: PrunableSite, use: LayerUse, spatial_in: list[int]):
    nd = len(site.shape) - 2
    kernel = [int(k) for k in use.attr("kernel_shape", list(site.shape[2:]))]  # type: ignore[union-attr]
    strides = [int(s) for s in use.attr("strides", [1] * nd)]  # type: ignore[union-attr]
    dil = [int(d) for d in use.attr("dilations", [1] * nd)]  # type: ignore[union-attr]
    auto = str(use.attr("auto_pad", "NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(nd):
            out = math.ceil(spatial_in[i] / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial_in[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    elif auto == "VALID":
        pads = [(0, 0)] * nd
    else:
        raw = list(use.attr("pads", [0] * (2 * nd)))  # type: ignore[arg-type]
        pads = [(int(raw[i]), int(raw[i + nd])) for i in range(nd)]
    return kernel, strides, dil, pads


def _im2col(site: PrunableSite, use: LayerUse, x: torch.Tensor) -> torch.Tensor:
    """Conv input (N, C, *spatial) -> (groups, N * L, C/groups * prod(kernel)), unfold column order."""
    kernel, strides, dil, pads = _conv_geometry(site, use, list(x.shape[2:]))
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, [(0, 0)] + pads
    flat_pad: list[int] = []
    for lo, hi in reversed(pads):
        flat_pad += [lo, hi]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    cols = F.unfold(x, kernel_size=kernel, dilation=dil, stride=strides)  # (N, C*prod(k), L)
    n, ck, length = cols.shape
    g = conv_groups(site, use)
    return cols.transpose(1, 2).reshape(n * length, g, ck // g).transpose(0, 1)


def conv_supported(site: PrunableSite) -> bool:
    """1-D and 2-D convolutions; 3-D ones are left dense by the layer-wise methods."""
    return site.op_type != "Conv" or len(site.shape) in (3, 4)


def count_rows(site: PrunableSite, use: LayerUse, shape: tuple[int, ...]) -> int:
    """Number of rows :func:`layer_input_rows` yields for an activation of this shape."""
    if site.op_type == "Conv":
        kernel, strides, dil, pads = _conv_geometry(site, use, list(shape[2:]))
        length = 1
        for i, size in enumerate(shape[2:]):
            span = (kernel[i] - 1) * dil[i] + 1
            length *= max((size + pads[i][0] + pads[i][1] - span) // strides[i] + 1, 0)
        return int(shape[0]) * length
    if site.op_type == "Gemm":
        return int(shape[1] if int(use.attr("transA", 0)) else shape[0])  # type: ignore[arg-type]
    numel = math.prod(shape)
    return numel // int(shape[-1]) if use.weight_position == 1 else numel // site.shape[1]


def layer_input_rows(site: PrunableSite, use: LayerUse, activation: np.ndarray) -> Iterator[torch.Tensor]:
    """Rows of X (one per token / position) for one use, as (groups, rows, in_per_group) chunks."""
    a = torch.from_numpy(np.ascontiguousarray(activation))
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    if site.op_type == "Conv":
        per = max(int(a[0:1].numel() * math.prod(site.shape[2:])), 1)
        step = max(int(_ROW_CHUNK_FLOATS // per), 1)
        for s in range(0, a.shape[0], step):
            yield _im2col(site, use, a[s : s + step])
        return
    if site.op_type == "Gemm":
        rows = a.t() if int(use.attr("transA", 0)) else a  # type: ignore[arg-type]
    elif use.weight_position == 1:  # X @ W
        rows = a.reshape(-1, a.shape[-1])
    else:  # W @ X: X is (..., in, n)
        rows = (a.unsqueeze(-1) if a.dim() == 1 else a.transpose(-1, -2)).reshape(-1, site.shape[1])
    step = max(int(_ROW_CHUNK_FLOATS // max(rows.shape[1], 1)), 1)
    for s in range(0, rows.shape[0], step):
        yield rows[s : s + step].unsqueeze(0)


class RowStatistics:
    """Streaming X^T X per group (float64; or only diag(X^T X) with ``full=False``) of one layer.

    Call :meth:`plan` with the length of the whole row stream before the first :meth:`add`: when it
    exceeds ``max_rows`` a seeded uniform subset of exactly ``max_rows`` stream positions is drawn and
    only those rows are accumulated (``max_rows=None``: every row).
    """

    def __init__(self, groups: int, cols: int, *, full: bool, max_rows: int | None = DEFAULT_MAX_ROWS, seed: int = 0):
        if max_rows is not None and max_rows < 1:
            raise InvalidOptionError(f"max_rows_per_layer must be >= 1, got {max_rows}")
        self.h = torch.zeros(groups, cols, cols, dtype=torch.float64) if full else None
        self.sq = torch.zeros(groups, cols, dtype=torch.float64)
        self.sum = torch.zeros(groups, cols, dtype=torch.float64)  # column sums (the mean, for shrinkage)
        self.max_rows = max_rows
        self.seed = int(seed)
        self.rows_total = 0  # rows seen in the stream
        self.rows_used = 0  # rows accumulated
        self._keep: np.ndarray | None = None  # sorted stream positions to keep (None = all)
        self._planned = False

    def plan(self, total_rows: int) -> None:
        self._planned = True
        if self.max_rows is not None and total_rows > self.max_rows:
            rng = np.random.default_rng(self.seed)
            self._keep = np.sort(rng.choice(total_rows, size=self.max_rows, replace=False))

    @property
    def subsampled(self) -> bool:
        return self._keep is not None

    def add(self, x: torch.Tensor) -> None:
        """Add a (groups, rows, cols) block of consecutive stream rows."""
        if not self._planned:
            raise RuntimeError("RowStatistics.plan must be called before add")
        start, n = self.rows_total, int(x.shape[1])
        self.rows_total += n
        if self._keep is not None:
            lo, hi = np.searchsorted(self._keep, [start, start + n])
            if hi == lo:
                return
            x = x[:, torch.from_numpy(self._keep[lo:hi] - start)]
        x = x.double()
        if self.h is not None:
            self.h += torch.bmm(x.transpose(1, 2), x)
        self.sq += (x * x).sum(dim=1)
        self.sum += x.sum(dim=1)
        self.rows_used += int(x.shape[1])

    def hessian(self, group: int = 0) -> torch.Tensor:
        """H = 2 X^T X / n over the rows used (SparseGPT's / GPTQ's scale)."""
        if self.h is None:
            raise RuntimeError("RowStatistics(full=False) holds only the diagonal")
        return 2.0 * self.h[group] / max(self.rows_used, 1)
