"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, Alg. 1) on one layer, and its graph-level pruner.

Layer-wise objective min_W' ||W X^T - W' X^T||_F^2, separable over output rows with the common Hessian
H = 2 X^T X / n (damped, :func:`~fls_compress.pruning.hessian.damped_inverse_cholesky`). The
column sweep is the shared OBS sweep :func:`~fls_compress.pruning.sweep.obs_sweep` (the same code
path as GPTQ quantisation): with U the upper Cholesky factor of H^-1, fixing column i costs
w_ri^2 / U_ii^2 and moves the later columns by -(w_ri / U_ii) U[i, i:].

Mask selection (adaptive, Alg. 1 lines 5-7): unstructured - at the start of each lazy block of
``block_size`` (128) columns, the block's entries with the smallest saliency w^2 / U_ii^2 (current,
already compensated weights) are pruned; per-block quotas come from cumulative rounding, so the
layer reaches exactly its prune count. N:M - in every group of M the N entries of each row with the
smallest saliency, chosen when the sweep reaches the group (the lazy block is then M columns, so the
saliency is computed on the group's compensated weights, as in the paper). For Conv weights the
groups run over input channels at a fixed kernel position: the sweep runs in the column order of
:func:`~fls_compress.pruning.selection.nm_column_order` (OBS is exact in any column order).
"""

from __future__ import annotations

import torch

from ..errors import InvalidOptionError
from .hessian import damped_inverse_cholesky, permute_hessian
from .layerwise import LayerwisePruner
from .sweep import Select, obs_sweep


def nm_select(forced: torch.Tensor, n_prune: int) -> Select:
    """N:M selection for a sweep whose lazy blocks are exactly the groups of M columns: in each row the
    N entries with the smallest saliency w^2 / U_ii^2 (already-dead entries count first)."""

    def select(block: torch.Tensor, d: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        score = (block**2 / d).masked_fill(forced[:, i1:i2], float("-inf"))
        idx = torch.topk(score, n_prune, dim=1, largest=False).indices
        return torch.zeros(score.shape, dtype=torch.bool).scatter_(1, idx, True)

    return select


def adaptive_select(forced: torch.Tensor, prune_count: int) -> Select:
    """Unstructured adaptive selection: block quotas by cumulative rounding of ``prune_count`` over the
    columns, the lowest saliencies w^2 / U_ii^2 of each block (already-dead entries count first)."""
    cols = forced.shape[1]
    total, done = int(prune_count), [0]

    def select(block: torch.Tensor, d: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        dead = forced[:, i1:i2]
        target = int(round(total * i2 / cols))
        k = min(max(target - done[0], int(dead.sum())), block.numel())
        chosen = torch.zeros(dead.shape, dtype=torch.bool)
        if k > 0:
            score = (block**2 / d).masked_fill(dead, float("-inf"))
            chosen.view(-1)[torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices] = True
        done[0] += k
        return chosen

    return select


def sparsegpt_prune_matrix(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    prune_count: int | None = None,
    nm: tuple[int, int] | None = None,
    alive: torch.Tensor | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    col_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one (rows, cols) matrix with Hessian ``h`` (cols x cols). Returns (W', keep mask).

    Unstructured: exactly ``prune_count`` entries end up pruned (at least the ones already dead in
    ``alive``); N:M: N pruned in every group of M consecutive columns of each row, in the column order
    ``col_order`` (``None``: natural order).
    """
    w = w.detach().to(torch.float64)
    rows, cols = w.shape
    alive = torch.ones(rows, cols, dtype=torch.bool) if alive is None else alive.bool()
    if col_order is not None:
        w, alive = w[:, col_order], alive[:, col_order]
    u = damped_inverse_cholesky(permute_hessian(h, col_order), percdamp)
    forced = ~alive
    if nm is not None:
        res = obs_sweep(w, u, prune_mask=forced, select=nm_select(forced, nm[0]), block_size=nm[1])
    else:
        if prune_count is None:
            raise ValueError("prune_count or nm is required")
        res = obs_sweep(w, u, prune_mask=forced, select=adaptive_select(forced, prune_count), block_size=block_size)
    new_w, keep = res.weight, ~res.pruned
    if col_order is not None:
        inv = torch.argsort(col_order)
        new_w, keep = new_w[:, inv], keep[:, inv]
    return new_w, keep


class SparseGPTPruner(LayerwisePruner):
    """SparseGPT from onnxruntime-captured layer inputs; ``percdamp`` and ``block_size`` as in the paper."""

    method = "sparsegpt"
    full_hessian = True

    def __init__(self, onnx_model=None, *, percdamp: float = 0.01, block_size: int = 128, **options):
        super().__init__(onnx_model, **options)
        if block_size < 1 or not percdamp >= 0:
            raise InvalidOptionError("SparseGPT needs block_size >= 1 and percdamp >= 0")
        self.percdamp = float(percdamp)
        self.block_size = int(block_size)

    def prune_matrix(self, w, stats, group, *, prune_count, nm, alive, col_order):
        return sparsegpt_prune_matrix(w, stats.hessian(group), prune_count=prune_count, nm=nm, alive=alive,
                                      block_size=self.block_size, percdamp=self.percdamp, col_order=col_order)
