"""OBS-compensated quantisation of one weight matrix: RTN, GPTQ, and the FishLeg-curvature variant.

All three fix the input columns of W (out, in) to grid values; GPTQ and FLS compensate the error of
each fixed column on the columns not yet fixed, through the shared sweep
:func:`~fls_compress.pruning.sweep.obs_sweep` (the code path SparseGPT prunes with):

* ``rtn`` - round to nearest: Q = grid(W), no compensation.
* ``gptq`` (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", ICLR 2023, Alg. 1): layer Hessian H = 2 X^T X / n from
  captured inputs, damped by percdamp * mean(diag H), U = chol_upper(H^-1); column i is rounded and
  err = (w_i - q_i) / U_ii is propagated as W[:, i:] -= err U[i, i:] (eq. 3), in lazy blocks.
  ``act_order``: columns swept in order of decreasing diag(H) (GPTQ's ``--act-order``), undone after.
* ``fls``: the same sweep with the inverse curvature of FishLeg's Kronecker factors (Garcia et al.
  2023; McGowan et al. 2024): U = chol_upper(L L^T) and per-row column scaling ``row_scale`` = A, so
  row r uses H_r^-1 = D_r U^T U D_r (see the sweep's docstring).

Sparse + quantised in one sweep (SparseGPT, section 3.4 "joint sparsification and quantization"): a
prune mask, an adaptive unstructured selection or an N:M selection decides which weights become 0;
the others are rounded to the grid; pruned weights are exactly 0 and 0 is on every grid.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InvalidOptionError
from ..pruning.hessian import damped_inverse_cholesky, permute_hessian
from ..pruning.sparsegpt import adaptive_select, nm_select
from ..pruning.sweep import SweepResult, inverse_hessian_cholesky, obs_sweep
from .grid import Grid


def sweep_quantize(
    w: torch.Tensor,
    u: torch.Tensor,
    grid: Grid,
    *,
    order: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    alive: torch.Tensor | None = None,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
) -> SweepResult:
    """Quantise (and optionally prune) ``w`` (out, in) with OBS compensation.

    ``u`` (and ``row_scale``) describe the columns in sweep order ``w[:, order]``; ``grid`` and the
    result are in the natural column order. ``alive`` False entries are removed; ``prune_count``
    removes that many in total (adaptive, SparseGPT), ``nm`` N of every M consecutive swept columns.
    """
    w = w.detach().to(torch.float64)
    rows, cols = w.shape
    alive = torch.ones(rows, cols, dtype=torch.bool) if alive is None else alive.bool()
    if order is not None:
        w, alive = w[:, order], alive[:, order]
    forced = ~alive
    select, bs = None, block_size
    if nm is not None:
        if cols % nm[1]:
            raise InvalidOptionError(f"N:M needs the input width ({cols}) to be a multiple of {nm[1]}")
        select, bs = nm_select(forced, nm[0]), nm[1]
    elif prune_count:
        select = adaptive_select(forced, prune_count)
    res = obs_sweep(w, u.to(torch.float64), row_scale=row_scale, prune_mask=forced, select=select,
                    quantize=grid.column_quantizer(order), block_size=bs)
    if order is not None:
        inv = torch.argsort(order)
        res = SweepResult(res.weight[:, inv], res.pruned[:, inv], res.loss)
    return res


def act_order(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by decreasing diag(H) (stable, so ties keep the natural order)."""
    return torch.argsort(-h.diagonal(), stable=True)


def gptq_quantize_matrix(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: Grid,
    *,
    percdamp: float = 0.01,
    use_act_order: bool = False,
    col_order: torch.Tensor | None = None,
    alive: torch.Tensor | None = None,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
) -> SweepResult:
    """GPTQ (with optional joint pruning) from the layer Hessian ``h`` = 2 X^T X / n.

    ``col_order`` is a fixed sweep order (the N:M layout of a Conv); ``use_act_order`` replaces it by
    decreasing diag(H) and cannot be combined with N:M.
    """
    if use_act_order:
        if nm is not None:
            raise InvalidOptionError("act_order cannot be combined with an N:M pattern (groups fix the column order)")
        col_order = act_order(h)
    u = damped_inverse_cholesky(permute_hessian(h.to(torch.float64), col_order), percdamp)
    return sweep_quantize(w, u, grid, order=col_order, alive=alive, prune_count=prune_count, nm=nm,
                          block_size=block_size)


def fls_quantize_matrix(
    w: torch.Tensor,
    u: torch.Tensor,
    row_scale: torch.Tensor | None,
    grid: Grid,
    *,
    col_order: torch.Tensor | None = None,
    alive: torch.Tensor | None = None,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
) -> SweepResult:
    """The sweep with a supplied inverse-curvature factor ``u`` (U^T U = L L^T, natural column order)
    and per-row column scale ``row_scale`` (out, in) (FishLeg's A). A non-trivial ``col_order``
    re-factorises the permuted inverse: chol_upper((U^T U)[order][:, order])."""
    u = u.to(torch.float64)
    scale = None if row_scale is None else row_scale.to(torch.float64)
    if col_order is not None:
        hinv = u.t() @ u
        u, _ = inverse_hessian_cholesky(hinv[col_order][:, col_order])
        scale = None if scale is None else scale[:, col_order]
    return sweep_quantize(w, u, grid, order=col_order, row_scale=scale, alive=alive, prune_count=prune_count,
                          nm=nm, block_size=block_size)


def rtn_quantize_matrix(w: np.ndarray, grid: Grid, keep: np.ndarray | None = None) -> np.ndarray:
    """Round to nearest (float32 grid values); entries with ``keep`` False become exactly 0."""
    q = grid.quantize(w)
    return q if keep is None else np.where(keep, q, np.float32(0.0)).astype(np.float32)
