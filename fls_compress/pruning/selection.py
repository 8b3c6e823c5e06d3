"""Which weights to remove, given per-weight saliency scores.

Scores are dicts keyed by ONNX initializer name; weights already pruned (mask False) and weights that
must not be pruned carry ``+inf``. Selection never revives a pruned weight.

* :func:`select_global` - the lowest scores across all layers (global ranking, as WoodFisher, oBERT and
  M-FAC do on ResNet-50), so sparsity is distributed where the loss cares least.
* :func:`select_per_layer` - the same fraction in every layer (uniform sparsity).
* :func:`select_n_of_m` - semi-structured N:M: in every group of M weights along the reduction
  (input) axis, remove the N lowest-scoring ones. The groups follow the layout sparse tensor cores
  consume (NVIDIA Ampere 2:4; Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"): for a
  Gemm/MatMul weight, M consecutive input features of one output row; for a Conv weight
  [O, C, kh, kw], M consecutive INPUT CHANNELS at one (o, kh, kw) - not M consecutive entries of the
  flattened C*kh*kw axis. :func:`nm_column_order` gives the column permutation of the (out, in)
  matrix view in which those groups are consecutive; a Conv whose C (per group) is not a multiple of
  M stays dense (warning; :func:`nm_dense_layers` lists them).
* :func:`allocate_counts` - split an exact prune count over layers by largest remainder.
"""

from __future__ import annotations

import logging
import math

import torch

from ..bridge.weights import PrunableWeight
from ..configs.pruning import parse_pattern  # noqa: F401  (one N:M parser, re-exported)

log = logging.getLogger(__name__)


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
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)  # masks stay on the weights' device
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


def allocate_counts(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over parts proportionally to ``sizes`` (largest remainder, exact sum)."""
    s = sum(sizes)
    if s == 0:
        return [0] * len(sizes)
    exact = [total * z / s for z in sizes]
    base = [min(int(math.floor(e)), z) for e, z in zip(exact, sizes)]
    rest = total - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (exact[i] - base[i]), reverse=True)
    for i in order:
        if rest <= 0:
            break
        if base[i] < sizes[i]:
            base[i] += 1
            rest -= 1
    return base


def nm_column_order(channels: int, kernel_size: int) -> torch.Tensor | None:
    """Permutation of the matrix-view columns that makes the N:M groups consecutive.

    The (out, in) view of a Conv weight has column c * K + k (input channel c of ``channels``, kernel
    position k of ``kernel_size`` = prod(kernel)). Reading the columns in the order k * C + c puts the
    channels of one kernel position next to each other, so groups of M consecutive permuted columns
    are groups of M input channels at a fixed (kh, kw). Returns ``None`` when no permutation is needed
    (Gemm/MatMul, 1x1 kernels).
    """
    if kernel_size == 1:
        return None
    return torch.arange(channels * kernel_size).reshape(channels, kernel_size).t().reshape(-1)


def nm_layout(op_type: str, shape: tuple[int, ...], cols: int) -> tuple[int, torch.Tensor | None]:
    """(size of the N:M reduction axis, :func:`nm_column_order`) of a weight with ONNX ``shape`` whose
    matrix view has ``cols`` columns: Conv -> (C per group, channel-major order), else (cols, None)."""
    if op_type == "Conv" and len(shape) > 2:
        return int(shape[1]), nm_column_order(int(shape[1]), int(math.prod(shape[2:])))
    return int(cols), None


def nm_groupable(channels: int, m: int) -> bool:
    """Whether the reduction axis (input channels per group for Conv, input features otherwise) splits into M's."""
    return channels % m == 0


def _conv_dims(w: PrunableWeight) -> tuple[int, int]:
    """(channels along the reduction axis, kernel positions) of a weight's matrix view."""
    shape = tuple(w.parameter.shape)
    if w.op_type == "Conv" and len(shape) > 2:
        return int(shape[1]), int(math.prod(shape[2:]))
    return int(w.matrix_shape[1]), 1


def nm_dense_layers(weights: dict[str, PrunableWeight], m: int) -> list[str]:
    """The weights an N:M pattern with group size ``m`` must leave dense (reduction axis not a multiple of M)."""
    return [n for n, w in weights.items() if not nm_groupable(_conv_dims(w)[0], m)]


def select_n_of_m(
    scores: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    weights: dict[str, PrunableWeight],
    n: int,
    m: int,
) -> dict[str, torch.Tensor]:
    """N:M selection along the input (reduction) axis; Conv groups run over input channels (module doc).

    Layers whose reduction axis is not a multiple of M are left dense with a warning.
    """
    out = {}
    for name, s in scores.items():
        w = weights[name]
        channels, kernel = _conv_dims(w)
        if not nm_groupable(channels, m):
            log.warning("N:M %d:%d: %r has %d input channels, not a multiple of %d; left dense", n, m, name, channels, m)
            out[name] = torch.zeros_like(masks[name])
            continue
        mat = w.to_matrix(s.to(torch.float64))
        dead = ~w.to_matrix(masks[name])
        perm = nm_column_order(channels, kernel)
        if perm is not None:
            perm = perm.to(mat.device)
            mat, dead = mat[:, perm], dead[:, perm]
        rows, cols = mat.shape
        groups = mat.reshape(rows, cols // m, m)
        already = dead.reshape(rows, cols // m, m)
        # count what is already pruned in each group; prune the rest up to N by lowest score
        order = torch.argsort(groups.masked_fill(already, float("-inf")), dim=-1)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order).contiguous())
        chosen = ((rank < n) & ~already).reshape(rows, cols)
        if perm is not None:
            chosen = chosen[:, torch.argsort(perm)]
        out[name] = w.from_matrix(chosen)
    return out
