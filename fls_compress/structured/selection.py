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


#: removals whose H^-1 downdates wait as low-rank factors before one matrix product applies them
LAZY_REMOVALS = 64


class _Elimination:
    """The running block elimination of one consumer's ``hinv``, applied lazily (as GPTQ's lazy batch
    updates, Frantar et al. 2023, sec. 4 step 2): the current inverse is ``hinv - V V^T``, where each
    removal of a channel S appends V_S = (H^-1)_{:,S} L^-T with L L^T = (H^-1)_SS (the eq. 9 downdate
    as a rank-b product), and ``hinv`` is rewritten only every :data:`LAZY_REMOVALS` removals. A removal
    then costs O(n k b) for its current columns instead of the O(n^2) rewrite of H^-1 (n = columns).
    The diagonal b x b blocks the costs read are kept current on their own."""

    def __init__(self, system: ConsumerSystem, size: int):
        self.system, self.size, b = system, size, system.block
        n = system.hinv.shape[0]
        self.v = system.hinv.new_zeros(n, LAZY_REMOVALS * b)
        self.k = 0
        self.dead = torch.zeros(n, dtype=torch.bool)
        if b == 1:
            self.blocks = torch.diagonal(system.hinv)[:size].clone()  # (C,)
        else:
            idx = torch.arange(size)
            self.blocks = system.hinv[: size * b, : size * b].reshape(size, b, size, b)[idx, :, idx, :].clone()  # (C, b, b)

    def costs(self, alive: torch.Tensor) -> torch.Tensor:
        """E_S of every channel (``inf`` for removed ones): 1/2 tr(((H^-1)_SS)^-1 W_S^T W_S), batched, from
        the b x b Gram of each block's columns (no solve with the output rows as right-hand sides)."""
        system, size, b = self.system, self.size, self.system.block
        if b == 1:
            cost = 0.5 * torch.linalg.vector_norm(system.w[:, :size], dim=0).square() / torch.where(alive, self.blocks, torch.ones_like(self.blocks))
        else:
            hss = self.blocks.clone()
            hss[~alive] = torch.eye(b, dtype=hss.dtype)
            ws = system.w[:, : size * b].reshape(-1, size, b)
            gram = torch.einsum("orb,orc->rbc", ws, ws)
            cost = 0.5 * (torch.linalg.inv(hss) * gram).sum(dim=(1, 2))
        return torch.where(alive, cost, torch.full_like(cost, float("inf")))

    def remove(self, channel: int) -> None:
        """The OBS update of ``w`` (OBC eq. 8) and the eq. 9 downdate, as the factor V_S, for one channel."""
        system, b = self.system, self.system.block
        cols = slice(channel * b, (channel + 1) * b)
        v = self.v[:, : self.k]
        h_s = system.hinv[:, cols] - v @ v[cols].T  # current (H^-1)_{:,S}
        h_s[self.dead] = 0.0  # removed columns are exactly out of the system
        low = torch.linalg.cholesky(h_s[cols])
        v_s = torch.linalg.solve_triangular(low, h_s.T, upper=False).T  # (H^-1)_{:,S} L^-T
        z = torch.linalg.solve_triangular(low, system.w[:, cols].T, upper=False).T  # W_S L^-T
        system.w.addmm_(z, v_s.T, alpha=-1.0)  # dW = -W_S ((H^-1)_SS)^-1 (H^-1)_{S,:}
        system.w[:, cols] = 0.0
        part = v_s[: self.size * b]
        if b == 1:
            self.blocks -= part[:, 0] ** 2
        else:
            part = part.reshape(self.size, b, b)
            self.blocks -= torch.einsum("cik,cjk->cij", part, part)
        self.dead[cols] = True
        self.v[:, self.k : self.k + b] = v_s
        self.k += b
        if self.k == self.v.shape[1]:
            self.flush()

    def flush(self) -> None:
        """Apply the pending downdates to ``hinv`` (removed rows and columns exactly zero)."""
        if self.k:
            v = self.v[:, : self.k]
            self.system.hinv.addmm_(v, v.T, alpha=-1.0)
            self.k = 0
        self.system.hinv[self.dead, :] = 0.0
        self.system.hinv[:, self.dead] = 0.0


def obs_select(systems: list[ConsumerSystem], size: int, count: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy structured OBS: the kept channels (sorted) and the cost of each removal in order; the
    systems are compensated in place. The many small steps run on one thread (measured several times
    faster than two on a shared 2-core machine; they are memory-bound)."""
    alive = torch.ones(size, dtype=torch.bool)
    costs: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [_Elimination(s, size) for s in systems]
        for _ in range(count):
            total = sum(r.costs(alive) for r in runs)
            best = int(torch.argmin(total))  # first minimum: deterministic
            costs.append(float(total[best]))
            for r in runs:
                r.remove(best)
            alive[best] = False
        for r in runs:
            r.flush()
    finally:
        torch.set_num_threads(threads)
    return torch.nonzero(alive).reshape(-1), costs
