"""Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024, eq. 1) on one layer, and its graph-level pruner.

Score S_ij = |W_ij| ||X_j||_2 (the diagonal-Hessian OBD saliency of the layer-wise objective, square
rooted), compared within each output row: the lowest fraction of every row is pruned, no weight is
updated. N:M: the N lowest scores in every group of M (Conv: M input channels at one kernel
position, see :func:`~fls_compress.pruning.selection.nm_column_order`).
"""

from __future__ import annotations

import torch

from .layerwise import LayerwisePruner
from .selection import allocate_counts


def wanda_prune_matrix(
    w: torch.Tensor,
    col_sq_norm: torch.Tensor,
    *,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    alive: torch.Tensor | None = None,
    col_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda on one (rows, cols) matrix given ||X_j||^2 per column; returns (W', keep mask)."""
    w = w.detach().clone().to(torch.float64)
    rows, cols = w.shape
    alive = torch.ones_like(w, dtype=torch.bool) if alive is None else alive.clone().bool()
    score = (w.abs() * col_sq_norm.to(torch.float64).clamp_min(0).sqrt()[None, :]).masked_fill(~alive, float("-inf"))
    if nm is not None:
        n_prune, m = nm
        if col_order is not None:
            score = score[:, col_order]
        groups = score.reshape(rows, cols // m, m)
        idx = torch.topk(groups, n_prune, dim=-1, largest=False).indices
        prune = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
        if col_order is not None:
            prune = prune[:, torch.argsort(col_order)]
    else:
        if prune_count is None:
            raise ValueError("prune_count or nm is required")
        per_row = torch.tensor(allocate_counts(int(prune_count), [cols] * rows), dtype=torch.long)
        per_row = torch.maximum(per_row, (~alive).sum(dim=1))
        order = torch.argsort(score, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(cols).expand(rows, cols).contiguous())
        prune = rank < per_row[:, None]
    prune |= ~alive
    w[prune] = 0.0
    return w, alive & ~prune


class WandaPruner(LayerwisePruner):
    """Wanda from onnxruntime-captured layer inputs (only diag(X^T X) is accumulated)."""

    method = "wanda"
    full_hessian = False

    def prune_matrix(self, w, stats, group, *, prune_count, nm, alive, col_order):
        return wanda_prune_matrix(w, stats.sq[group], prune_count=prune_count, nm=nm, alive=alive, col_order=col_order)
