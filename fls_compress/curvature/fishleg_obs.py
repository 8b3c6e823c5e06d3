"""Group OBS updates with FishLeg's learned inverse Fisher (FishLeg Surgeon, McGowan et al. 2024).

Removing a set P of weights at once, the OBS problem (Hassibi & Stork 1993) with the local model
1/2 d^T Q^{-1} d is min_d d^T Q^{-1} d s.t. (theta + d)_P = 0, solved by d = -Q[:, P] (Q_PP)^{-1} theta_P.

* :func:`kron_sweep_update` (Kronecker Q, default): the lazy-block column sweep of
  :func:`fls_compress.pruning.sweep.obs_sweep` per output row with H_r^{-1} = D_{A_r} L L^T D_{A_r}
  (the cross-row terms of R^T R are dropped; the scalar (R^T R)_rr cancels). One Cholesky of L L^T per
  layer, O(in^3 + out in^2) for every width (OBC, Frantar & Alistarh 2022; SparseGPT, Frantar &
  Alistarh 2023, Alg. 1).
* :func:`kron_row_exact_update` (reference, and the default up to 2048 inputs): the same per-row problem
  solved exactly, one Cholesky solve per row over the removed or the kept inputs, whichever are fewer
  (O(out min(|P|, |K|)^3)): every kept weight of the row may move, whereas the sweep only moves the
  columns to the right of each removed one. With the inner diagonal of the
  EKFAC-style form the row blocks differ, H_r^{-1} = D_{A_r} L diag(C_r) L^T D_{A_r}, and are used
  row by row; the sweep, which needs one factor shared by all rows, then uses the row mean of C
  (recorded per layer).
* :func:`block_exact_update` (block-diagonal Q): the exact group OBS inside every block, batched.
"""

from __future__ import annotations

import torch

from ..pruning.sweep import inverse_hessian_cholesky, obs_sweep


def kron_upper_factor(L: torch.Tensor, inner: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """U upper with U^T U = L diag(inner) L^T (``inner`` = 1 if None), float64, and the jitter that was needed."""
    L = L.detach().double()
    if inner is not None:
        return inverse_hessian_cholesky((L * inner.detach().double()) @ L.t())
    return inverse_hessian_cholesky(L @ L.t())


def kron_sweep_update(
    theta: torch.Tensor, gone: torch.Tensor, upper: torch.Tensor, A: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (out, in) weights (removed entries exactly 0) and the per-row sweep loss."""
    res = obs_sweep(theta.double(), upper, row_scale=A.detach().double(), prune_mask=gone, block_size=block_size)
    return res.weight, res.loss


def kron_row_exact_update(
    theta: torch.Tensor, new: torch.Tensor, gone: torch.Tensor, L: torch.Tensor, A: torch.Tensor, inner: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact per-row group OBS (matrix view): the change of theta, float64.

    Row r's block of Q is Q_r = D Q0_r D with D = diag(A_r), Q0_r = L diag(C_r) L^T (C = ``inner``, or 1).
    With P the removed and K the kept inputs of the row, the minimiser of d^T Q_r^{-1} d s.t.
    (theta + d)_P = 0 is, in the two equivalent forms (Schur complements; Hassibi & Stork 1993):

    * P-form: d = -D Q0[:, P] (Q0_PP)^{-1} (theta_P / A_P): a |P| x |P| solve;
    * K-form: w_K = theta_K + D_K (H0_KK)^{-1} H0_KP (theta_P / A_P), H0 = Q0^{-1}: a |K| x |K| solve.

    Without ``inner`` Q0 is shared and each row uses the smaller system (:func:`_shared_rows`); with it,
    every row takes the K-form with its own H0_r = W^T diag(1 / C_r) W, W = L^{-1}.
    """
    theta = theta.double()
    L = L.detach().double()
    scale = A.detach().double()
    rows = torch.nonzero(new.any(1)).flatten()
    if inner is None:
        return _shared_rows(theta, gone, L, scale, rows)
    w_inv = torch.linalg.inv(L)
    inv_c = 1.0 / inner.detach().double().clamp_min(1e-300)
    delta = torch.zeros_like(theta)
    for r in rows.tolist():
        removed = gone[r]
        kept = ~removed
        delta[r, removed] = -theta[r, removed]
        if not bool(kept.any()):
            continue
        x = theta[r, removed] / scale[r, removed]
        wk = w_inv[:, kept]
        zk = wk.t() * inv_c[r]  # W_K^T diag(1 / C_r)
        h_kk = zk @ wk
        h_kk = 0.5 * (h_kk + h_kk.t())
        rhs = zk @ (w_inv[:, removed] @ x)
        delta[r, kept] = scale[r, kept] * torch.linalg.solve(h_kk, rhs)
    return delta


def _shared_rows(theta: torch.Tensor, gone: torch.Tensor, L: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """:func:`kron_row_exact_update` for a Q0 = L L^T shared by all rows: per row one Cholesky solve of the
    smaller system (P-form or K-form); the rows' changes are then formed by one matrix product per form."""
    delta = torch.zeros_like(theta)
    if rows.numel() == 0:
        return delta
    q0 = L @ L.t()
    q0 = 0.5 * (q0 + q0.t())
    h0 = None
    g = gone[rows]
    use_p = (g.sum(1) * 2 <= g.shape[1]).tolist()
    x = torch.where(g, theta[rows] / scale[rows], 0.0)  # theta_P / A_P, 0 on K
    if not all(use_p):
        h0 = torch.linalg.inv(q0)
        h0 = 0.5 * (h0 + h0.t())
        hx = x @ h0  # row i: (H0 x_i)^T, of which the K entries are H0_KP (theta_P / A_P)
    z = torch.zeros_like(x)  # P-form: z_P per row; K-form: y_K per row
    for i, p_form in enumerate(use_p):
        idx = torch.nonzero(g[i] if p_form else ~g[i]).flatten()
        if idx.numel() == 0:
            continue
        mat = q0 if p_form else h0
        sub = mat[idx[:, None], idx[None, :]]  # type: ignore[index]
        rhs = (x[i] if p_form else hx[i])[idx]
        chol, info = torch.linalg.cholesky_ex(sub)
        if int(info) == 0:
            z[i, idx] = torch.cholesky_solve(rhs[:, None], chol)[:, 0]
        else:  # numerically indefinite sub-block: pivoted LU
            z[i, idx] = torch.linalg.solve(sub, rhs)
    p_rows = torch.tensor(use_p, dtype=torch.bool, device=theta.device)
    change = torch.where(p_rows[:, None], -(z @ q0), z)  # P-form: -Q0[:, P] z (Q0 symmetric)
    delta[rows] = torch.where(g, -theta[rows], scale[rows] * change)  # removed weights go exactly to zero
    return delta


def block_exact_update(theta: torch.Tensor, new: torch.Tensor, gone: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Exact group OBS inside each block of a block-diagonal Q = blockdiag(B_k B_k^T).

    ``theta``/``new``/``gone`` are flat (n,) over the layer's row-major matrix view, ``blocks`` the layer's
    (k, b, b) factors (the last block zero-padded past n). Only blocks with a newly removed weight move:
    in such a block d = -Q[:, P] (Q_PP)^{-1} theta_P with P all removed weights of the block (earlier
    ones included, which keeps them at 0). Solved for all blocks at once as
    (D_P Q D_P + I - D_P) z = D_P theta, d = -Q z with D_P the 0/1 indicator of P.
    """
    k, b, _ = blocks.shape
    n = theta.numel()
    pad = k * b - n
    th = torch.cat([theta.double(), theta.new_zeros(pad, dtype=torch.float64)]).reshape(k, b)
    nw = torch.cat([new, new.new_zeros(pad)]).reshape(k, b)
    gn = torch.cat([gone, gone.new_zeros(pad)]).reshape(k, b)
    active = nw.any(1)
    delta = torch.zeros(k, b, dtype=torch.float64, device=theta.device)
    if bool(active.any()):
        B = blocks[active].detach().double()
        Q = B @ B.transpose(1, 2)
        p = gn[active].double()
        M = p[:, :, None] * Q * p[:, None, :] + torch.diag_embed(1.0 - p)
        z = torch.linalg.solve(M, (p * th[active]).unsqueeze(-1))
        d = -(Q @ z).squeeze(-1)
        delta[active] = torch.where(gn[active], -th[active], d)
    return delta.reshape(-1)[:n]
