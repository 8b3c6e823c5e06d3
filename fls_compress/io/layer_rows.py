"""Rows of a layer's input X and their second moments, streamed.

:func:`layer_input_rows` turns an activation captured by :mod:`fls_compress.io.activations` into rows
of X in the (out, in) matrix view: MatMul ``X @ W`` -> X flattened to (-1, in); ``W @ X`` -> the last
two axes swapped; Gemm -> A (A^T when ``transA=1``); Conv (1-D/2-D) -> im2col (the patches
``torch.nn.functional.unfold`` gives, gathered by index) with the node's kernel_shape / strides / pads / dilations / auto_pad,
one block per group (``group > 1`` and depthwise included). :class:`RowStatistics` accumulates X^T X
per group chunk by chunk, never holding X whole; :meth:`RowStatistics.add_activation` builds only the
rows it keeps (a subsampled Conv's patches are gathered at the kept positions, not unfolded whole).

Precision of X^T X. Captured rows are float32. Each block of at most :data:`GRAM_BLOCK` rows is
multiplied in float32 (BLAS sgemm, about twice dgemm's speed) and the blocks are summed in float64.
For a block of m rows every entry satisfies |fl(sum_r x_ri x_rj) - sum_r x_ri x_rj| <= gamma_m
sum_r |x_ri x_rj| with gamma_m = m u / (1 - m u), u = 2^-24 (Higham, "Accuracy and Stability of
Numerical Algorithms", 2002, eq. 3.5: any summation order, so any BLAS blocking), hence by
Cauchy-Schwarz <= gamma_m sqrt(H_ii H_jj): at m = 4096 at most 2.4e-4 of the diagonal scale, in
practice ~sqrt(m) u ~ 4e-6 (rounding errors of a blocked sum do not all align). The float64 sum of the
blocks adds at most (blocks) * 2^-53 relative. GPTQ/SparseGPT damp H by 1% of its mean diagonal, two
orders of magnitude above the worst case. Float64 rows (tests, structured pruning) stay float64.

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

from ..configs.pruning import DEFAULT_MAX_ROWS
from ..errors import InvalidOptionError
from .activations import LayerUse, conv_groups
from .onnx_model import PrunableSite

_ROW_CHUNK_FLOATS = 2e7  # elements of X processed at once
#: rows per float32 X^T X block (see the module doc for the error bound this length gives)
GRAM_BLOCK = 4096
_SYM_BLOCK = 512  # column block of the lower-triangle X^T X products (wider layers compute ~half)


def _lower_gram(out: torch.Tensor, x: torch.Tensor) -> None:
    """out += X^T X for x (groups, rows, cols), computed on the block lower triangle only when cols spans
    two or more blocks of _SYM_BLOCK (the blocks above stay zero until :func:`_mirrored`): the same sums,
    (p + 1) / 2p of the work for p blocks."""
    cols = int(x.shape[-1])
    if cols < 2 * _SYM_BLOCK:
        out.baddbmm_(x.transpose(1, 2), x)
        return
    for g in range(int(x.shape[0])):
        xg = x[g]
        for i in range(0, cols, _SYM_BLOCK):
            out[g, i:, i : i + _SYM_BLOCK].addmm_(xg[:, i:].T, xg[:, i : i + _SYM_BLOCK])


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


def _padded_2d(site: PrunableSite, use: LayerUse, x: torch.Tensor):
    """The Conv input zero-padded and viewed as 2-D (1-D: height 1), with its 2-D kernel geometry."""
    kernel, strides, dil, pads = _conv_geometry(site, use, list(x.shape[2:]))
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, [(0, 0)] + pads
    flat_pad: list[int] = []
    for lo, hi in reversed(pads):
        flat_pad += [lo, hi]
    if any(flat_pad):
        x = F.pad(x, flat_pad)
    return x, kernel, strides, dil


def _im2col(site: PrunableSite, use: LayerUse, x: torch.Tensor) -> torch.Tensor:
    """Conv input (N, C, *spatial) -> (groups, N * L, C/groups * prod(kernel)), unfold column order
    (equal to ``torch.nn.functional.unfold``'s patches; gathered, which is many times faster on CPU)."""
    return _patches_at(site, use, x, torch.arange(count_rows(site, use, tuple(x.shape))))


def _patches_at(site: PrunableSite, use: LayerUse, x: torch.Tensor, rows: torch.Tensor,
                channels_last: bool = False) -> torch.Tensor:
    """The rows ``rows`` (indices n * L + l into this chunk's :func:`_im2col` rows) of the patch matrix,
    gathered from the padded input without unfolding the others: (groups, len(rows), C/groups * prod(kernel)).
    ``channels_last`` (one group only): columns in (kh, kw, C) order instead of unfold's (C, kh, kw), which
    saves a copy; :func:`channels_last_order` maps them back."""
    xp, kernel, strides, dil = _padded_2d(site, use, x)
    out_h = (xp.shape[2] - (kernel[0] - 1) * dil[0] - 1) // strides[0] + 1
    out_w = (xp.shape[3] - (kernel[1] - 1) * dil[1] - 1) // strides[1] + 1
    n, pos = rows // (out_h * out_w), rows % (out_h * out_w)
    hi = (pos // out_w)[:, None] * strides[0] + torch.arange(kernel[0]) * dil[0]  # (R, kh)
    wi = (pos % out_w)[:, None] * strides[1] + torch.arange(kernel[1]) * dil[1]  # (R, kw)
    cl = xp.permute(0, 2, 3, 1)  # channels last: each gathered element is a contiguous C-vector
    patches = cl[n[:, None, None], hi[:, :, None], wi[:, None, :]]  # (R, kh, kw, C)
    if channels_last and conv_groups(site, use) == 1:
        return patches.reshape(1, len(rows), -1)
    flat = patches.permute(0, 3, 1, 2).reshape(len(rows), -1)  # unfold's column order (C, kh, kw)
    g = conv_groups(site, use)
    return flat.reshape(len(rows), g, -1).transpose(0, 1)


def channels_last_order(site: PrunableSite) -> torch.Tensor:
    """perm with unfold column j = channels-last column perm[j] (see :func:`_patches_at`)."""
    c, k = int(site.shape[1]), int(math.prod(site.shape[2:]))
    return (torch.arange(k)[None, :] * c + torch.arange(c)[:, None]).reshape(-1)


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


def _mirrored(h: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from what :func:`_lower_gram` accumulated (blocks above the diagonal
    blocks copied from below; a new tensor)."""
    cols = int(h.shape[-1])
    full = h.clone()
    if cols >= 2 * _SYM_BLOCK:
        for i in range(0, cols - _SYM_BLOCK, _SYM_BLOCK):
            j = i + _SYM_BLOCK
            full[i:j, j:] = h[j:, i:j].T
    return full


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
        self._sq = None if full else torch.zeros(groups, cols, dtype=torch.float64)
        self._perm: torch.Tensor | None = None  # rows arrive with columns permuted (channels-last patches)
        self._sum = torch.zeros(groups, cols, dtype=torch.float64)  # column sums (the mean, for shrinkage)
        self.max_rows = max_rows
        self.seed = int(seed)
        self.rows_total = 0  # rows seen in the stream
        self.rows_used = 0  # rows accumulated
        self._keep: np.ndarray | None = None  # sorted stream positions to keep (None = all)
        self._planned = False
        self._partial: torch.Tensor | None = None  # float32 X^T X of the latest rows, not yet in `h`
        self._partial_rows = 0

    def plan(self, total_rows: int) -> None:
        self._planned = True
        if self.max_rows is not None and total_rows > self.max_rows:
            rng = np.random.default_rng(self.seed)
            self._keep = np.sort(rng.choice(total_rows, size=self.max_rows, replace=False))

    @property
    def subsampled(self) -> bool:
        return self._keep is not None

    @property
    def sq(self) -> torch.Tensor:
        """diag(X^T X) per group (groups, cols): summed exactly from the rows with ``full=False``, else
        the diagonal of the accumulated X^T X."""
        if self._sq is None:
            self._flush()
            d = self.h.diagonal(dim1=1, dim2=2).clone()  # type: ignore[union-attr]
        else:
            d = self._sq
        return d if self._perm is None else d[:, self._perm]

    @property
    def sum(self) -> torch.Tensor:
        """Column sums of the rows used, per group (groups, cols), in the layer's column order."""
        return self._sum if self._perm is None else self._sum[:, self._perm]

    def _order(self, perm: torch.Tensor | None) -> None:
        if self.rows_used and (perm is None) != (self._perm is None):
            raise RuntimeError("RowStatistics: rows in two column orders")
        self._perm = perm

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
        self._order(None)
        self._accumulate(x)

    def _accumulate(self, x: torch.Tensor) -> None:
        """X^T X of float32 rows in float32 partial sums of at most GRAM_BLOCK rows (across calls), each
        partial added to the float64 total when full (module doc); float64 rows straight into it."""
        s, n = 0, int(x.shape[1])
        while s < n:
            b = x[:, s : s + (GRAM_BLOCK - self._partial_rows if x.dtype == torch.float32 else n)]
            s += int(b.shape[1])
            if self.h is not None:
                if b.dtype == torch.float32:
                    if self._partial is None:
                        self._partial = torch.zeros(self.h.shape, dtype=torch.float32)
                    _lower_gram(self._partial, b)
                    self._partial_rows += int(b.shape[1])
                    if self._partial_rows >= GRAM_BLOCK:
                        self._flush()
                else:
                    _lower_gram(self.h, b.double())
            if self._sq is not None:
                bd = b.double()
                self._sq += (bd * bd).sum(dim=1)
            # column sums as a (groups, 1, rows) x (groups, rows, cols) product: one BLAS pass over the block
            ones = torch.ones(b.shape[0], 1, b.shape[1], dtype=b.dtype)
            self._sum += torch.bmm(ones, b)[:, 0].double()
        self.rows_used += n

    def _flush(self) -> None:
        if self._partial is not None and self._partial_rows:
            self.h += self._partial  # type: ignore[operator]
            self._partial.zero_()
        self._partial_rows = 0

    def add_activation(self, site: PrunableSite, use: LayerUse, activation: np.ndarray) -> None:
        """Add the rows of one captured activation chunk of ``use`` (the next stretch of the row stream).

        Same rows and order as :meth:`add` over :func:`layer_input_rows`; when subsampling, a Conv's
        kept rows are gathered directly (:func:`_patches_at`) instead of unfolding every patch."""
        if site.op_type != "Conv":
            for x in layer_input_rows(site, use, activation):
                self.add(x)
            return
        if not self._planned:
            raise RuntimeError("RowStatistics.plan must be called before add")
        a = torch.from_numpy(np.ascontiguousarray(activation))
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        start, n = self.rows_total, count_rows(site, use, tuple(a.shape))
        self.rows_total += n
        if self._keep is not None:
            lo, hi = np.searchsorted(self._keep, [start, start + n])
            rows = torch.from_numpy(self._keep[lo:hi] - start)
        else:
            rows = torch.arange(n)
        last = conv_groups(site, use) == 1
        self._order(channels_last_order(site) if last else None)
        step = max(int(_ROW_CHUNK_FLOATS // max(self.h.shape[-1] if self.h is not None else 1, 1)), 1)
        for s in range(0, len(rows), step):
            self._accumulate(_patches_at(site, use, a, rows[s : s + step], channels_last=last))

    def hessian(self, group: int = 0) -> torch.Tensor:
        """H = 2 X^T X / n over the rows used (SparseGPT's / GPTQ's scale)."""
        if self.h is None:
            raise RuntimeError("RowStatistics(full=False) holds only the diagonal")
        self._flush()
        h = _mirrored(self.h[group])
        if self._perm is not None:
            h = h[self._perm][:, self._perm]
        return 2.0 * h / max(self.rows_used, 1)
