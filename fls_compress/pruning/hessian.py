"""The damped layer Hessian and its inverse Cholesky factor, shared by SparseGPT and GPTQ.

For the layer-wise objective ||W X^T - W' X^T||_F^2 every output row has the Hessian
H = 2 X^T X / n (Frantar & Alistarh 2022, OBC, eq. 1). SparseGPT and GPTQ (Frantar et al. 2023, GPTQ,
section 4 "Step 3: Cholesky reformulation") add percdamp * mean(diag H) to the diagonal and sweep with
the upper Cholesky factor U of H^-1 (U^T U = H^-1), see :func:`fls_compress.pruning.sweep.obs_sweep`.
"""

from __future__ import annotations

import logging

import torch

from ..errors import UnsupportedModelError

log = logging.getLogger(__name__)


def damped_inverse_cholesky(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H); damp grows 10x on failure.

    Dead inputs (H_jj = 0) keep H_jj = 0, so after damping their weights cost w^2 * damp: they are
    removed first when pruning (nearly free on the calibration data) and never move other weights.
    (The reference implementations set H_jj = 1 and zero those weights; an absolute 1 can make dead
    inputs look MORE important than live ones when activations are small, and zeroing them changes
    the model off the calibration set.)

    One Cholesky factorisation and one triangular inverse: with P the reversal permutation and
    P (H + damp I) P = L L^T (lower L), (H + damp I)^-1 = P L^-T L^-1 P = U^T U for U = P L^-1 P,
    which is upper triangular with a positive diagonal, i.e. THE upper Cholesky factor of the inverse
    (unique). This costs n^3/3 + n^3/3 flops (:func:`lower_triangular_inverse`) instead of the
    n^3/3 + 2 n^3 + n^3/3 of factorising, inverting and factorising the inverse again (GPTQ's reference
    code), and never needs the second factorisation to succeed.
    """
    h = h.to(torch.float64)
    mean = float(h.diagonal().clamp_min(0).mean())
    if not mean > 0:
        mean = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    flipped = h.flip(0, 1)  # P H P, P the reversal permutation
    damp = max(percdamp * mean, 1e-10 * mean)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(flipped + damp * eye)
        if int(info) == 0:
            return lower_triangular_inverse(chol).flip(0, 1)
        damp *= 10.0
        log.debug("layer Hessian: Cholesky failed, damping raised to %.3e", damp)
    raise UnsupportedModelError("the layer Hessian could not be factorised")


#: below this size the triangular inverse is one triangular solve against I
_TRI_BLOCK = 256


def lower_triangular_inverse(low: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L^-1 of a lower-triangular L by 2x2 block recursion, all off-diagonal work in matrix products:

        [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]].

    n^3/3 flops as LAPACK's trtri (a triangular solve against I does n^3 and runs at a fraction of
    GEMM speed: 5x slower at n = 4096 on CPU); the products keep the triangular factors' zeros. The
    blocks are written into one zeroed ``out`` (allocated once at the top: the recursion levels' own
    zeroed copies took as long as the products' first level at n = 4096).
    """
    n = low.shape[0]
    if out is None:
        out = torch.zeros_like(low)
    if n <= _TRI_BLOCK:
        out.copy_(torch.linalg.solve_triangular(low, torch.eye(n, dtype=low.dtype, device=low.device), upper=False))
        return out
    k = n // 2
    a_inv = lower_triangular_inverse(low[:k, :k], out[:k, :k])
    c_inv = lower_triangular_inverse(low[k:, k:], out[k:, k:])
    torch.matmul(c_inv, low[k:, :k] @ a_inv, out=out[k:, :k]).neg_()
    return out


def permute_hessian(h: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """H restricted to the column order ``order`` (H[order][:, order])."""
    return h if order is None else h[order][:, order]
