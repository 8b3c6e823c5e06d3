"""Which channels of a structural group to remove, and how the consumers compensate.

* :func:`l2_select`: the magnitude baseline, the channels whose producer weights (one filter / one
  weight row each, plus nothing else) have the smallest L2 norm (Li et al. 2017 rank filters the same
  way with the L1 norm); no compensation.
* :func:`obs_select`: second-order structured OBS on the consumers' layer Hessians, as in OBC (Frantar
  & Alistarh 2022, Sec. 4, "structured" / block OBS) and ZipLM (Kurtic et al. 2023, eq. 2-3). A
  consumer computes ``W x`` with ``x`` its input rows and ``H = 2 X^T X / n`` (damped). Removing the
  set ``S`` of input columns (one channel = a block of ``k*k`` kernel positions of a Conv, or ``H*W``
  features after a Flatten) and letting the other columns move optimally costs

      E_S = 1/2 * sum over rows of  W[:, S] ((H^-1)_SS)^-1 W[:, S]^T                  (OBC eq. 7, block form)

  and the optimal change of the whole row is

      dW = - W[:, S] ((H^-1)_SS)^-1 (H^-1)_{S, :}                                     (OBC eq. 8)

  which sets ``W[:, S]`` to zero and is exactly the least-squares refit of the remaining columns on
  the same data. Channels are removed greedily one at a time (the one of least ``E`` given those
  already removed), and after each removal ``H^-1`` becomes the inverse of ``H`` restricted to the
  remaining columns by the block elimination ``H^-1 <- H^-1 - (H^-1)_{:,S} ((H^-1)_SS)^-1 (H^-1)_{S,:}``
  (OBC eq. 9). A group with several consumers sums their costs; each consumer is updated with its own
  ``H``. When the consumer has its own bias, ``x`` is augmented with a constant 1 (never removed), so
  the update also moves the bias by what the removed channels contributed on average (ZipLM's
  treatment of the output bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def removal_count(size: int, fraction: float, multiple: int = 1) -> int:
    """Channels to remove from a group of ``size`` at ``fraction`` (rounded half up, at least one kept).

    With ``multiple`` > 1 the number kept is the multiple of ``multiple`` nearest ``size - removed``
    (ties up), at least ``multiple`` and at most ``size``; groups smaller than ``multiple`` stay whole."""
    removed = max(0, min(size - 1, int(size * fraction + 0.5)))
    if multiple <= 1:
        return removed
    if size < multiple:
        return 0
    kept = multiple * int((size - removed) / multiple + 0.5)
    return size - min(size, max(multiple, kept))


def l2_select(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (sorted) of the channels to keep: drop the ``count`` rows of least L2 norm.

    ``rows``: (channels, fan_in) producer weights, one row per channel. Ties go to the lower index
    (stable sort), so the choice is deterministic."""
    norms = rows.double().pow(2).sum(dim=1)
    order = torch.sort(norms, stable=True).indices
    return torch.sort(order[count:]).values


@dataclass
class ConsumerSystem:
    """One consumer in the (out, in) matrix view: ``w`` (float64, ``bias`` appended as the last column
    when ``has_bias``), ``hinv`` = (H + damping)^-1 over the same columns, ``block`` columns per channel.
    Removed channels' columns of ``w`` and rows/columns of ``hinv`` are exactly zero after the update."""

    w: torch.Tensor
    hinv: torch.Tensor
    block: int
    has_bias: bool

    def full(self) -> torch.Tensor:
        """The compensated weights at full width (zero in the removed columns)."""
        return self.w


def damped_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(H + percdamp * mean(diag H) I)^-1 by Cholesky (SparseGPT's damping; columns never seen get
    their diagonal set to 1 first, as in its reference code)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.diagonal(h).mean()
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def _block_costs(system: ConsumerSystem, size: int, alive: torch.Tensor) -> torch.Tensor:
    """E_S of every channel (``inf`` for removed ones): 1/2 tr(((H^-1)_SS)^-1 W_S^T W_S), batched, from the
    b x b Gram of each block's columns (no solve with the output rows as right-hand sides)."""
    b = system.block
    if b == 1:
        diag = torch.diagonal(system.hinv)[:size]
        cost = 0.5 * system.w[:, :size].pow(2).sum(dim=0) / torch.where(alive, diag, torch.ones_like(diag))
    else:
        idx = torch.arange(size)
        hss = system.hinv[: size * b, : size * b].reshape(size, b, size, b)[idx, :, idx, :]  # (C, b, b)
        hss[~alive] = torch.eye(b, dtype=hss.dtype)
        ws = system.w[:, : size * b].reshape(-1, size, b)
        gram = torch.einsum("orb,orc->rbc", ws, ws)
        cost = 0.5 * (torch.linalg.inv(hss) * gram).sum(dim=(1, 2))
    return torch.where(alive, cost, torch.full_like(cost, float("inf")))


def _remove(system: ConsumerSystem, channel: int) -> None:
    """The OBS update of ``w`` and the block elimination of ``hinv`` for one channel (module docstring)."""
    b = system.block
    cols = slice(channel * b, (channel + 1) * b)
    hss = system.hinv[cols, cols]
    inv = 1.0 / hss if b == 1 else torch.linalg.inv(hss)
    coef = inv @ system.hinv[cols]  # ((H^-1)_SS)^-1 (H^-1)_{S,:}
    system.w -= system.w[:, cols] @ coef
    system.hinv -= system.hinv[:, cols] @ coef
    system.w[:, cols] = 0.0
    system.hinv[cols, :] = 0.0
    system.hinv[:, cols] = 0.0


def obs_select(systems: list[ConsumerSystem], size: int, count: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy structured OBS: the kept channels (sorted) and the cost of each removal in order; the
    systems are compensated in place. The many small steps run on one thread (measured several times
    faster than two on a shared 2-core machine; they are memory-bound)."""
    alive = torch.ones(size, dtype=torch.bool)
    costs: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(count):
            total = sum(_block_costs(s, size, alive) for s in systems)
            best = int(torch.argmin(total))  # first minimum: deterministic
            costs.append(float(total[best]))
            for s in systems:
                _remove(s, best)
            alive[best] = False
    finally:
        torch.set_num_threads(threads)
    return torch.nonzero(alive).reshape(-1), costs
