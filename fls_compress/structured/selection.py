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


def step_removal_count(size: int, fraction: float, multiple: int = 1, original: int | None = None) -> int:
    """Channels to remove now from a group that has ``size`` left of ``original`` (a gradual prune's later step:
    ``fraction`` is of the original group, what earlier steps removed counts towards it); without ``original``
    :func:`removal_count` of ``size``."""
    if original is None:
        return removal_count(size, fraction, multiple)
    return max(0, removal_count(original, fraction, multiple) - (original - size))


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
    offset: int = 0  # column of the group's first channel (after a Concat, other tensors' columns come first)

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
    """The running block elimination of one consumer, applied lazily (as GPTQ's lazy batch updates,
    Frantar et al. 2023, sec. 4 step 2). Removing channel S with L L^T = (H^-1)_SS appends

        V_S = (H^-1)_{:,S} L^-T   and   Z_S = W_S L^-T,

    so that the eq. 9 downdate is ``H^-1 - V_S V_S^T`` and the eq. 8 update ``W - Z_S V_S^T``; the current
    H^-1 and W are ``hinv - V V^T`` and ``w - Z V^T``, rewritten only every :data:`LAZY_REMOVALS`
    removals by one matrix product each. Between rewrites a removal costs one pass over W (W^T Z_S, for
    the costs) and O(n k b), instead of rewriting the n x n H^-1 and the out x n W. The costs' inputs,
    the diagonal b x b blocks of H^-1 and the b x b Grams W_c^T W_c of each channel's columns, are kept
    current by the same rank-b terms."""

    def __init__(self, system: ConsumerSystem, size: int):
        self.system, self.size, b = system, size, system.block
        n, out, o = system.hinv.shape[0], system.w.shape[0], system.offset
        self.v = system.hinv.new_zeros(n, LAZY_REMOVALS * b)
        self.z = system.w.new_zeros(out, LAZY_REMOVALS * b)
        self.k = 0
        self.dead = torch.zeros(n, dtype=torch.bool)
        idx = torch.arange(size)
        if b == 1:
            self.blocks = torch.diagonal(system.hinv)[o : o + size].clone()  # (C,)
            self.grams = torch.linalg.vector_norm(system.w[:, o : o + size], dim=0).square()  # (C,)
        else:
            self.blocks = system.hinv[o : o + size * b, o : o + size * b].reshape(size, b, size, b)[idx, :, idx, :].clone()
            ws = system.w[:, o : o + size * b].reshape(-1, size, b)
            self.grams = torch.einsum("orb,orc->rbc", ws, ws)  # (C, b, b)

    def costs(self, alive: torch.Tensor) -> torch.Tensor:
        """E_S of every channel (``inf`` for removed ones): 1/2 tr(((H^-1)_SS)^-1 W_S^T W_S), batched, from
        the b x b Gram of each block's columns (no solve with the output rows as right-hand sides)."""
        b = self.system.block
        if b == 1:
            cost = 0.5 * self.grams / torch.where(alive, self.blocks, torch.ones_like(self.blocks))
        else:
            hss = self.blocks.clone()
            hss[~alive] = torch.eye(b, dtype=hss.dtype)
            cost = 0.5 * (torch.linalg.inv(hss) * self.grams).sum(dim=(1, 2))
        return torch.where(alive, cost, torch.full_like(cost, float("inf")))

    def remove(self, channel: int) -> None:
        """The OBS update (OBC eq. 8) and the eq. 9 downdate of one channel, as the factors Z_S and V_S."""
        system, b, size, o = self.system, self.system.block, self.size, self.system.offset
        cols = slice(o + channel * b, o + (channel + 1) * b)
        v, z = self.v[:, : self.k], self.z[:, : self.k]
        h_s = system.hinv[:, cols] - v @ v[cols].T  # current (H^-1)_{:,S}
        h_s[self.dead] = 0.0  # removed columns are exactly out of the system
        low = torch.linalg.cholesky(h_s[cols])
        v_s = torch.linalg.solve_triangular(low, h_s.T, upper=False).T  # (H^-1)_{:,S} L^-T
        w_s = system.w[:, cols] - z @ v[cols].T  # current W_S
        z_s = torch.linalg.solve_triangular(low, w_s.T, upper=False).T  # W_S L^-T
        p = system.w.T @ z_s - v @ (z.T @ z_s)  # W^T Z_S of the current W
        q = z_s.T @ z_s
        pc, vc = p[o : o + size * b], v_s[o : o + size * b]
        if b == 1:  # W_c^T W_c -> (W_c - Z_S v_c)^T (W_c - Z_S v_c), v_c the channel's row of V_S
            self.blocks -= vc[:, 0] ** 2
            self.grams += vc[:, 0] * (vc[:, 0] * q[0, 0] - 2.0 * pc[:, 0])
        else:
            pc, vc = pc.reshape(size, b, b), vc.reshape(size, b, b)
            self.blocks -= torch.einsum("cik,cjk->cij", vc, vc)
            cross = torch.einsum("cik,cjk->cij", pc, vc)
            self.grams += torch.einsum("cik,kl,cjl->cij", vc, q, vc) - cross - cross.transpose(1, 2)
        self.dead[cols] = True
        self.v[:, self.k : self.k + b] = v_s
        self.z[:, self.k : self.k + b] = z_s
        self.k += b
        if self.k == self.v.shape[1]:
            self.flush()

    def flush(self) -> None:
        """Apply the pending updates to ``w`` and ``hinv`` (removed columns, and rows of ``hinv``, exactly zero)."""
        system = self.system
        if self.k:
            v, z = self.v[:, : self.k], self.z[:, : self.k]
            system.hinv.addmm_(v, v.T, alpha=-1.0)
            system.w.addmm_(z, v.T, alpha=-1.0)
            self.k = 0
        system.hinv[self.dead, :] = 0.0
        system.hinv[:, self.dead] = 0.0
        system.w[:, self.dead] = 0.0


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
