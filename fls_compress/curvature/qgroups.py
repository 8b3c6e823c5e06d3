"""Layers packed into shared Q modules so that one FishLeg step runs batched products.

* :class:`KronGroup`: all layers with the same (out, in) matrix shape share one stacked
  :class:`~.qforms.KroneckerQ` (leading dimension g; with or without the inner diagonal), so each
  product is one batched matmul.
* :class:`BlockGroup`: all layers share one :class:`~.qforms.BlockQ`; each layer's row-major matrix view
  is padded to whole blocks, so blocks never straddle layers and every product is one ``bmm``.

Tensors passed to ``pack`` are matrix views with a leading probe dimension: name -> (P, out, in).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .qforms import BlockQ, KroneckerQ, kron_diag, kron_products, kron_row_inner


class KronGroup:
    """Same-shaped layers sharing a stacked Kronecker Q."""

    kind = "kron"

    def __init__(self, names: list[str], a0: dict[str, torch.Tensor], inner: bool = False):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.q = KroneckerQ(torch.stack([a0[n] for n in self.names]), inner=inner)

    @property
    def params(self) -> list[nn.Parameter]:
        return self.q.params

    def lr_dims(self) -> list[int]:
        """The dimension that scales each parameter's learning rate (1/sqrt(dim)): a and b (out x in) use in."""
        dims = [self.q.a.shape[-1], self.q.R.shape[-1], self.q.L.shape[-1]]
        return dims + ([self.q.b.shape[-1]] if self.q.inner else [])

    def pack(self, mats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([mats[n] for n in self.names], -3)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: x[..., i, :, :] for i, n in enumerate(self.names)}

    def member(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, L, A) of one layer, detached."""
        i = self.index[name]
        return self.q.R[i].detach(), self.q.L[i].detach(), self.q.A[i].detach()

    def inner_one(self, name: str) -> torch.Tensor | None:
        """The inner diagonal B = B0 b^2 of one layer, detached (``None`` without it)."""
        if not self.q.inner:
            return None
        i = self.index[name]
        return (self.q.b0[i] * self.q.b[i] * self.q.b[i]).detach()

    def row_inner(self, name: str) -> torch.Tensor | None:
        """C = (R * R)^T B of one layer (:func:`~.qforms.kron_row_inner`), detached; ``None`` without B."""
        B = self.inner_one(name)
        return None if B is None else kron_row_inner(self.member(name)[0], B)

    def apply_one(self, name: str, m: torch.Tensor) -> torch.Tensor:
        R, L, A = self.member(name)
        return kron_products(m, A, R, L, self.inner_one(name))[0]

    def diag_one(self, name: str) -> torch.Tensor:
        R, L, A = self.member(name)
        return kron_diag(A, R, L, self.inner_one(name))

    def set_factors(self, name: str, R: torch.Tensor, L: torch.Tensor, inner: torch.Tensor | None = None) -> None:
        """Set R, L (and the inner diagonal's fixed part B0, with b = 1) of one layer."""
        i = self.index[name]
        with torch.no_grad():
            self.q.R[i].copy_(R)
            self.q.L[i].copy_(L)
            if inner is not None:
                self.q.b0[i].copy_(inner)
                self.q.b[i].fill_(1.0)


class BlockGroup:
    """All layers of the block form in one packed :class:`~.qforms.BlockQ`."""

    kind = "block"

    def __init__(self, names: list[str], a0: dict[str, torch.Tensor], block_size: int):
        self.names = list(names)
        self.block = int(block_size)
        self.numel = {n: a0[n].numel() for n in self.names}
        self.shape = {n: tuple(a0[n].shape) for n in self.names}
        self.range: dict[str, tuple[int, int]] = {}
        parts, start = [], 0
        for n in self.names:
            k = math.ceil(self.numel[n] / self.block)
            self.range[n] = (start, start + k)
            start += k
            flat = a0[n].reshape(-1)
            parts.append(torch.cat([flat, flat.new_full((k * self.block - flat.numel(),), float(flat.mean()))]))
        self.q = BlockQ(torch.cat(parts), self.block)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.q.B]

    def lr_dims(self) -> list[int]:
        return [self.block]

    def _padded(self, name: str, m: torch.Tensor) -> torch.Tensor:
        k0, k1 = self.range[name]
        flat = m.reshape(*m.shape[:-2], -1)
        pad = (k1 - k0) * self.block - flat.shape[-1]
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    def pack(self, mats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([self._padded(n, mats[n]) for n in self.names], -1)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            k0, k1 = self.range[n]
            flat = x[..., k0 * self.block : k0 * self.block + self.numel[n]]
            out[n] = flat.reshape(*x.shape[:-1], *self.shape[n])
        return out

    def blocks_of(self, name: str) -> torch.Tensor:
        k0, k1 = self.range[name]
        return self.q.B[k0:k1].detach()

    def apply_one(self, name: str, m: torch.Tensor) -> torch.Tensor:
        B = self.blocks_of(name)
        x = self._padded(name, m).reshape(-1, self.block, 1)
        y = torch.bmm(B, torch.bmm(B.transpose(1, 2), x)).reshape(-1)
        return y[: self.numel[name]].reshape(self.shape[name])

    def diag_one(self, name: str) -> torch.Tensor:
        B = self.blocks_of(name)
        return (B**2).sum(-1).reshape(-1)[: self.numel[name]].reshape(self.shape[name])
