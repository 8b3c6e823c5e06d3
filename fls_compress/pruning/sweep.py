"""One lazy-block OBS column sweep shared by pruning (FLS, SparseGPT) and OBS-compensated quantisation.

Optimal Brain Compression / SparseGPT / GPTQ (Frantar & Alistarh 2022, OBC; Frantar & Alistarh 2023,
SparseGPT, Alg. 1; Frantar et al. 2023, GPTQ, Alg. 1) process the input columns of a weight matrix in
a fixed order. Each row r has a quadratic loss 1/2 (w - theta)^T H_r (w - theta). When column i is
fixed to its target value q_i (0 if pruned, a grid point if quantised), the columns j > i that are
still free are re-optimised; with U_r the upper Cholesky factor of H_r^{-1} (U_r^T U_r = H_r^{-1})
the optimal correction and the loss it costs are (GPTQ, eq. 3 and section "Cholesky reformulation")

    err_r = (w_ri - q_ri) / [U_r]_ii,     w_r,j -= err_r [U_r]_ij  (j >= i),     loss_r += err_r^2 / 2,

because row i of U_r is the i-th column of the inverse Hessian of the still-free columns {i, ..., n},
scaled by the square root of its diagonal. Columns are processed in blocks of ``block_size``: inside
a block the update is applied column by column, the columns after the block receive the accumulated
errors in one matrix product (the "lazy batch" update of GPTQ, section "Lazy batch-updates").

Row-dependent curvature. FishLeg's Kronecker inverse Fisher restricted to output row r is
Q_r = (R^T R)_rr D_r (L L^T) D_r (Garcia et al. 2023, FishLeg; McGowan et al. 2024, FLS) with
D_r = diag(A_r). With U the upper Cholesky factor of L L^T, U_r = U D_r (columns scaled by A_r) is
upper triangular with U_r^T U_r = D_r L L^T D_r; the scalar (R^T R)_rr only rescales H_r and cancels
in the update. So one O(in^3) Cholesky per layer serves every row, and the sweep costs
O(out * in^2) instead of one dense solve per row.

The loss reported is exact for the final weights of a pure pruning / quantisation sweep:
sum_i err_ri^2 / 2 = 1/2 (w'_r - theta_r)^T H_r (w'_r - theta_r) with H_r = (U_r^T U_r)^{-1}.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Select = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
Quantize = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class SweepResult:
    """Outcome of :func:`obs_sweep`.

    weight: (out, in) updated weights; pruned entries exactly 0, quantised entries exactly on the grid.
    pruned: (out, in) bool, True = removed.
    loss: (out,) per-row OBS loss estimate sum_i err_ri^2 / 2 (in units of the row's H).
    """

    weight: torch.Tensor
    pruned: torch.Tensor
    loss: torch.Tensor


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """torch on one CPU thread for the block: the per-column steps are vector-sized operations whose
    fork/join across threads costs more than they compute, and on a loaded machine each join waits for a
    descheduled thread (a 2048 x 1024 sweep: 2.9 s on one thread, 33 s on two with the cores busy)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    row_scale: torch.Tensor | None = None,
    prune_mask: torch.Tensor | None = None,
    select: Select | None = None,
    quantize: Quantize | None = None,
    block_size: int = 128,
) -> SweepResult:
    """Prune and/or quantise ``W`` column by column with OBS compensation (SparseGPT/GPTQ sweep).

    Parameters
    ----------
    W:
        (out, in) weights (float64 recommended; computation happens in ``W``'s dtype and device).
    U:
        (in, in) upper-triangular with U^T U = H^{-1}, the inverse Hessian over the input columns shared
        by all rows.
    row_scale:
        Optional (out, in): row r uses U_r = U * row_scale[r] (column scaling), i.e.
        H_r^{-1} = D_r U^T U D_r with D_r = diag(row_scale[r]).
    prune_mask:
        Optional (out, in) bool: a fixed set to remove (True = remove).
    select:
        Optional adaptive selection ``select(W_block, d_block, i1, i2) -> (out, i2 - i1) bool`` called at
        the start of each column block with the compensated block weights and d_block = [U_r]_ii^2 for
        the block's columns (SparseGPT's adaptive mask selection: saliency w^2 / d). Its result is
        OR-ed with ``prune_mask``.
    quantize:
        Optional ``quantize(column (out,), col_index) -> (out,)`` mapping the already-compensated column
        to grid values. Pruned entries are 0 and never quantised: q = where(pruned, 0, quantize(w)).
    block_size:
        Number of columns per lazy block.
    """
    if W.dim() != 2:
        raise ValueError(f"obs_sweep: W must be 2-D, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if U.shape != (cols, cols):
        raise ValueError(f"obs_sweep: U must be ({cols}, {cols}), got {tuple(U.shape)}")
    if row_scale is not None and row_scale.shape != W.shape:
        raise ValueError(f"obs_sweep: row_scale must be {tuple(W.shape)}, got {tuple(row_scale.shape)}")
    if prune_mask is not None and prune_mask.shape != W.shape:
        raise ValueError(f"obs_sweep: prune_mask must be {tuple(W.shape)}, got {tuple(prune_mask.shape)}")
    if block_size < 1:
        raise ValueError("obs_sweep: block_size must be >= 1")
    dtype, device = W.dtype, W.device
    W = W.detach().clone()
    U = U.detach().to(dtype=dtype, device=device)
    scale = None if row_scale is None else row_scale.detach().to(dtype=dtype, device=device)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if prune_mask is not None:
        pruned |= prune_mask.to(device=device, dtype=torch.bool)
    loss = torch.zeros(rows, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        c = i2 - i1
        ub = U[i1:i2, i1:i2]
        sb = None if scale is None else scale[:, i1:i2]
        block = W[:, i1:i2].clone()
        # [U_r]_ii may vanish only for a zero row scale (a weight with zero inverse curvature)
        if sb is None:  # one value per column, shared by every row: kept a vector until `select` needs rows
            dvec = ub.diagonal().clone()
            dvec = torch.where(dvec.abs() < tiny, torch.full_like(dvec, tiny), dvec)
            diag = dvec.expand(rows, c)
        else:
            diag = ub.diagonal()[None, :] * sb
            diag = torch.where(diag.abs() < tiny, torch.full_like(diag, tiny), diag)
        gone = pruned[:, i1:i2]
        if select is not None:
            chosen = select(block, diag**2, i1, i2)
            if chosen.shape != (rows, c):
                raise ValueError(f"obs_sweep: select returned shape {tuple(chosen.shape)}, expected {(rows, c)}")
            gone |= chosen.to(device=device, dtype=torch.bool)
        zero = torch.zeros(rows, dtype=dtype, device=device)
        # the block column-major (row j of `cols_` is column j, contiguous): each step reads one column and
        # updates the columns after it, so this layout keeps both in contiguous memory (same arithmetic)
        cols_ = block.T.contiguous()
        gone_t = gone.T.contiguous()
        any_gone = bool(gone.any())
        diag_t = None if sb is None else diag.T.contiguous()
        scale_t = None if sb is None else sb.T.contiguous()
        errs_t = torch.zeros(c, rows, dtype=dtype, device=device)
        with _one_thread(device):
            for j in range(c):
                col = cols_[j]
                target = col if quantize is None else quantize(col, i1 + j).to(dtype=dtype, device=device)
                if any_gone:
                    target = torch.where(gone_t[j], zero, target)
                err = torch.sub(col, target, out=errs_t[j])
                err /= dvec[j] if diag_t is None else diag_t[j]
                if j + 1 < c and scale_t is None:
                    cols_[j + 1:].addr_(ub[j, j + 1:], err, alpha=-1)  # rank-1 update in place (BLAS ger)
                elif j + 1 < c:
                    cols_[j + 1:] -= (ub[j, j + 1:, None] * scale_t[j + 1:]) * err[None, :]
                cols_[j] = target  # exactly 0 / exactly on the grid
        errs = errs_t.T
        loss += 0.5 * (errs**2).sum(1)
        W[:, i1:i2] = cols_.T
        if i2 < cols:
            if scale is None:  # in place: no (rows, remaining) temporary per block
                W[:, i2:].addmm_(errs, U[i1:i2, i2:], alpha=-1)
            else:
                W[:, i2:] -= (errs @ U[i1:i2, i2:]) * scale[:, i2:]
    return SweepResult(W, pruned, loss)


def inverse_hessian_cholesky(h_inv: torch.Tensor, *, jitter: float = 1e-10, tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper U with U^T U = h_inv + eps I (eps = 0 if it factorises; grown 10x per failure).

    ``h_inv`` is the inverse Hessian itself (e.g. FishLeg's L L^T), so no inversion is needed.
    Returns (U, eps). Raises ``torch.linalg.LinAlgError`` if it cannot be factorised.
    """
    h_inv = 0.5 * (h_inv + h_inv.transpose(-1, -2))
    eye = torch.eye(h_inv.shape[-1], dtype=h_inv.dtype, device=h_inv.device)
    mean = float(h_inv.diagonal().abs().mean().clamp_min(torch.finfo(h_inv.dtype).tiny))
    eps = 0.0
    for _ in range(tries):
        upper, info = torch.linalg.cholesky_ex(h_inv + eps * eye, upper=True)
        if int(info) == 0:
            return upper, eps
        eps = jitter * mean if eps == 0.0 else eps * 10.0
    raise torch.linalg.LinAlgError("inverse Hessian is not positive definite even after jitter")
