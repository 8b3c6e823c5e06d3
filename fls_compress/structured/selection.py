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


def removal_count(size: int, fraction: float) -> int:
    """Channels to remove from a group of ``size`` at ``fraction`` (rounded half up, at least one kept)."""
    return max(0, min(size - 1, int(size * fraction + 0.5)))


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
    when ``has_bias``), ``hinv`` = (H + damping)^-1 over the same columns, ``block`` columns per channel."""

    w: torch.Tensor
    hinv: torch.Tensor
    block: int
    has_bias: bool

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        return (channels[:, None] * self.block + torch.arange(self.block)[None, :])


def damped_inverse(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(H + percdamp * mean(diag H) I)^-1 by Cholesky (SparseGPT's damping; columns never seen get
    their diagonal set to 1 first, as in its reference code)."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.diagonal(h).mean()
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def _block_costs(system: ConsumerSystem, channels: torch.Tensor) -> torch.Tensor:
    cols = system.columns(channels)  # (R, b)
    hss = system.hinv[cols[:, :, None], cols[:, None, :]]  # (R, b, b)
    ws = system.w[:, cols].permute(1, 0, 2)  # (R, out, b)
    sol = torch.linalg.solve(hss, ws.transpose(1, 2))  # (R, b, out) = Hss^-1 ws^T
    return 0.5 * (ws.transpose(1, 2) * sol).sum(dim=(1, 2))


def _remove(system: ConsumerSystem, channel: int) -> None:
    cols = system.columns(torch.tensor([channel]))[0]
    hss = system.hinv[cols][:, cols]
    rows_s = system.hinv[cols]  # (b, in)
    coef = torch.linalg.solve(hss, rows_s)  # Hss^-1 (H^-1)_{S,:}
    system.w -= system.w[:, cols] @ coef
    system.hinv -= system.hinv[:, cols] @ coef
    system.w[:, cols] = 0.0
    system.hinv[cols, :] = 0.0
    system.hinv[:, cols] = 0.0


def obs_select(systems: list[ConsumerSystem], size: int, count: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy structured OBS: the kept channels (sorted) and the cost of each removal in order; the
    systems' ``w`` are compensated in place (removed columns are zero)."""
    remaining = list(range(size))
    costs: list[float] = []
    for _ in range(count):
        idx = torch.tensor(remaining)
        total = sum(_block_costs(s, idx) for s in systems)
        best = int(torch.argmin(total))  # first minimum: deterministic
        channel = remaining.pop(best)
        costs.append(float(total[best]))
        for s in systems:
            _remove(s, channel)
    return torch.tensor(sorted(remaining)), costs
