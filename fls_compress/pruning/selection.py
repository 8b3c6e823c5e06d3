"""Which weights to remove, given per-weight saliency scores.

Scores are dicts keyed by ONNX initializer name; weights already pruned (mask False) and weights that
must not be pruned carry ``+inf``. Selection never revives a pruned weight.

* :func:`select_global` - the lowest scores across all layers (global ranking, as WoodFisher, oBERT and
  M-FAC do on ResNet-50), so sparsity is distributed where the loss cares least.
* :func:`select_per_layer` - the same fraction in every layer (uniform sparsity).
* :func:`select_n_of_m` - semi-structured N:M: in every group of M consecutive weights along the
  reduction (input) axis, remove the N lowest-scoring ones (the 2:4 pattern TensorRT consumes).
"""

from __future__ import annotations

import math

import torch

from ..bridge.weights import PrunableWeight
from ..errors import InvalidOptionError


def _newly_from_flat(scores: dict[str, torch.Tensor], chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n, s in scores.items():
        k = s.numel()
        out[n] = chosen[off : off + k].reshape(s.shape)
        off += k
    return out


def select_global(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], target_sparsity: float
) -> dict[str, torch.Tensor]:
    """Boolean "prune now" tensors so that the overall sparsity reaches ``target_sparsity``."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    k = max(math.ceil(target_sparsity * total - 1e-9) - pruned, 0)  # never fall short of the target
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in scores.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    finite = int(torch.isfinite(flat).sum())
    k = min(k, finite)
    if k > 0:
        idx = torch.topk(flat, k, largest=False, sorted=False).indices
        chosen[idx] = True
    return _newly_from_flat(scores, chosen)


def select_per_layer(
    scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], target_sparsity: float
) -> dict[str, torch.Tensor]:
    """Prune each layer to ``target_sparsity`` on its own."""
    out = {}
    for n, s in scores.items():
        out.update(select_global({n: s}, {n: masks[n]}, target_sparsity))
    return out


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """Parse ``"N:M"`` (e.g. ``"2:4"``: 2 zeros in every 4) into (N, M)."""
    if pattern is None or pattern == "":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise InvalidOptionError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise InvalidOptionError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def select_n_of_m(
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    weights: dict[str, PrunableWeight],
    n: int,
    m: int,
) -> dict[str, torch.Tensor]:
    """N:M selection along the input (reduction) axis of each weight's (out, in) matrix view.

    Layers whose input width is not a multiple of M are left dense (logged by the caller through the
    achieved per-layer sparsity).
    """
    out = {}
    for name, s in scores.items():
        w = weights[name]
        mat = w.to_matrix(s.to(torch.float64))
        rows, cols = mat.shape
        if cols % m:
            out[name] = torch.zeros_like(masks[name])
            continue
        groups = mat.reshape(rows, cols // m, m)
        already = (~w.to_matrix(masks[name])).reshape(rows, cols // m, m)
        # count what is already pruned in each group; prune the rest up to N by lowest score
        order = torch.argsort(groups.masked_fill(already, float("-inf")), dim=-1)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
        chosen = (rank < n) & ~already
        out[name] = w.from_matrix(chosen.reshape(rows, cols))
    return out
