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
    """
    h = h.to(torch.float64).clone()
    mean = float(h.diagonal().clamp_min(0).mean())
    if not mean > 0:
        mean = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp = max(percdamp * mean, 1e-10 * mean)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            # H^-1 by two triangular solves against I (BLAS-3); torch.cholesky_inverse (LAPACK potri) is
            # several times slower at the widths of real layers (4096: tens of seconds)
            h_inv = torch.cholesky_solve(eye, chol)
            upper, info2 = torch.linalg.cholesky_ex(0.5 * (h_inv + h_inv.T), upper=True)
            if int(info2) == 0:
                return upper
        damp *= 10.0
        log.debug("layer Hessian: Cholesky failed, damping raised to %.3e", damp)
    raise UnsupportedModelError("the layer Hessian could not be factorised")


def permute_hessian(h: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """H restricted to the column order ``order`` (H[order][:, order])."""
    return h if order is None else h[order][:, order]
