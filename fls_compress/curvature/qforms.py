"""Parametric forms of FishLeg's inverse Fisher Q(lambda), PSD by construction, with closed-form gradients.

FishLeg (Garcia, Sutton, Lim, Nickl, ICLR 2023) fits Q by minimising the auxiliary loss
A(lambda; u) = 1/2 u^T Q F_gamma Q u - u^T Q u. Its gradient is J_lambda^T r with r = F_gamma Q u - u
(Garcia et al. 2023, eq. 9), i.e. the gradient of the surrogate s(lambda) = <c, Q(lambda) u> with
c = r held fixed (or c = Q r for the preconditioned variant of McGowan et al. 2024, FLS, Alg. 1).
Both forms below return d s / d lambda in closed form (:meth:`surrogate_grads`), reusing the
intermediates of the product v = Q u computed before the Fisher product, so a fit step needs no
autograd graph through Q.

* :class:`KroneckerQ`: Q = D_A (R^T R kron L L^T) D_A on the (out, in) matrix view,
  Q . U = A * (R^T R (A * U) L L^T) (Garcia et al. 2023, section 3.2). Optional leading "stack"
  dimension: layers with the same matrix shape share one module and every product is a batched
  matmul. diag(Q)[a, b] = A_ab^2 ||R_{:,a}||^2 ||L_{b,:}||^2.
  With ``inner=True`` a learned inner diagonal B = B0 * b * b (>= 0, so Q stays PSD) sits between the
  factors: Q . U = A * (R^T (B * (R (A * U) L)) L^T). With R, L orthogonal this is the eigenvalue-corrected
  Kronecker form (EKFAC, George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
  Eigenbasis"), which holds the *exact* damped inverse of a Kronecker product,
  (G kron X + gamma I)^{-1} = (U_G kron U_X) diag(1 / (g_i x_j + gamma)) (U_G kron U_X)^T; FishLeg then
  learns R, L, A and B from there. diag(Q) = A^2 * ((R*R)^T B (L*L)^T).
* :class:`BlockQ`: a flat vector split into blocks of ``block_size`` (last one padded),
  Q = blockdiag(B_k B_k^T). Several layers are packed into one module (each layer padded to whole
  blocks, so no block straddles two layers) and every product is one ``bmm`` over all blocks.

Probes: inputs may carry extra leading dimensions (several probes u_1..u_p); gradients are summed
over them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum the extra leading (probe) dimensions of ``t`` away to get ``shape``."""
    extra = t.dim() - len(shape)
    return t.sum(dim=tuple(range(extra))) if extra > 0 else t


def _drop_unit_lead(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``t`` as its trailing ``ndim`` dimensions when the leading ones hold a single element."""
    return t.reshape(t.shape[t.dim() - ndim:]) if t.dim() > ndim and math.prod(t.shape[: t.dim() - ndim]) == 1 else t


def kron_products(
    u: torch.Tensor, A: torch.Tensor, R: torch.Tensor, L: torch.Tensor, B: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """v = A * (R^T (B * (R (A * u) L)) L^T) (B = 1 if ``None``) and the intermediates
    (X L, R X L, R^T (B * R X L), K(X)) that :meth:`KroneckerQ.surrogate_grads` reuses; any leading dims."""
    x = A * u
    xl = x @ L
    p = R @ xl
    nxl = R.transpose(-1, -2) @ (p if B is None else B * p)
    kx = nxl @ L.transpose(-1, -2)
    return A * kx, (xl, p, nxl, kx)


def kron_rounding_bound(
    u: torch.Tensor, A: torch.Tensor, R: torch.Tensor, L: torch.Tensor, B: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Componentwise bound on |fl(v) - v| for :func:`kron_products` run on ``dtype`` copies of u and the factors.

    Standard rounding model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 2.4 and
    Thm 3.5/eq. 3.13): each cast to ``dtype`` and each stored intermediate is one relative rounding of at most
    the unit round-off ``eps`` (2^-8 for bfloat16), and each product accumulates in float32 (oneDNN's and
    torch's CPU bf16 GEMMs do), adding at most gamma_n = n u32 / (1 - n u32) with u32 = 2^-24 over its inner
    dimension n. Along the chain x = A*u, XL, R(XL), B*., R^T(.), (.)L^T, A*. there are c = 13 roundings
    (u once, A, R and L twice each, six stored intermediates; 15 with B), so with the magnitudes
    |v| <= V = |A| * (|R|^T (|B| * |R| (|A| * |u|) |L|) |L|^T) the error is at most
    (gamma_c(eps) + sum_k gamma_{n_k}(u32)) * V, gamma_c(eps) = c eps / (1 - c eps). Returns that bound,
    computed in float64.
    """
    eps = torch.finfo(dtype).eps / 2  # unit round-off (finfo.eps is the spacing at 1)
    roundings = 15 if B is not None else 13
    u32 = 2.0**-24
    inner = (L.shape[-2], R.shape[-1], R.shape[-2], L.shape[-1])  # inner dims of the four GEMMs
    gamma = roundings * eps / (1 - roundings * eps) + sum(n * u32 / (1 - n * u32) for n in inner)
    mags = [None if t is None else t.detach().double().abs() for t in (u, A, R, L, B)]
    return gamma * kron_products(*mags)[0]  # type: ignore[arg-type]


def kron_diag(A: torch.Tensor, R: torch.Tensor, L: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """diag(Q) in the (out, in) view: A^2 * ((R*R)^T B (L*L)^T), or A_ab^2 ||R_{:,a}||^2 ||L_{b,:}||^2 without B."""
    if B is not None:
        return A**2 * ((R**2).transpose(-1, -2) @ B @ (L**2).transpose(-1, -2))
    col_r = (R**2).sum(-2)  # ||R_{:,a}||^2
    row_l = (L**2).sum(-1)  # ||L_{b,:}||^2
    return A**2 * col_r[..., :, None] * row_l[..., None, :]


def kron_row_inner(R: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """C = (R * R)^T B: Q's (row r, row r) block is D_{A_r} L diag(C_r) L^T D_{A_r}."""
    return (R**2).transpose(-1, -2) @ B


class KroneckerQ(nn.Module):
    """Q = D_A (R^T R kron L L^T) D_A acting on (..., out, in) matrices; A = A0 * a with a learnable.

    ``a0`` is (out, in) or (g, out, in) for a stack of g same-shaped layers. ``inner=True`` adds the
    inner diagonal B = B0 * b * b (``b0`` buffer, ``b`` learnable, both shaped like ``a0``).
    """

    def __init__(self, a0: torch.Tensor, inner: bool = False):
        super().__init__()
        *lead, out_f, in_f = a0.shape
        self.register_buffer("a0", a0.clone())
        self.a = nn.Parameter(torch.ones_like(a0))
        self.inner = bool(inner)
        if self.inner:
            self.register_buffer("b0", torch.ones_like(a0))
            self.b = nn.Parameter(torch.ones_like(a0))
        eye_o = torch.eye(out_f, dtype=a0.dtype, device=a0.device)
        eye_i = torch.eye(in_f, dtype=a0.dtype, device=a0.device)
        self.R = nn.Parameter(eye_o.expand(*lead, out_f, out_f).clone())
        self.L = nn.Parameter(eye_i.expand(*lead, in_f, in_f).clone())
        self._held: tuple[torch.dtype | None, tuple[torch.Tensor | None, ...]] | None = None

    @property
    def A(self) -> torch.Tensor:
        return self.a0 * self.a

    @property
    def B(self) -> torch.Tensor | None:
        """The inner diagonal B0 * b^2 (``None`` without ``inner``)."""
        return self.b0 * self.b * self.b if self.inner else None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.a, self.R, self.L] + ([self.b] if self.inner else [])

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.products(u)[0]

    def products(self, u: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """v = Q u and the intermediates that :meth:`surrogate_grads` reuses (see :func:`kron_products`).
        ``dtype``: compute on copies of u and the factors in that dtype (v and the cache come out in it)."""
        (m,), (A, R, L, B) = self._operands(u, dtype=dtype)
        v, cache = kron_products(m, A, R, L, B)
        return v.reshape(u.shape), cache

    def _factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, ...]:
        """(A, R, L, B), cast to ``dtype`` if given."""
        return tuple(f if f is None or dtype is None else f.to(dtype) for f in (self.A, self.R, self.L, self.B))

    @contextmanager
    def held(self, dtype: torch.dtype | None = None) -> Iterator[None]:
        """Inside the block, products called without a ``dtype`` compute in ``dtype`` on one copy of
        (A = A0 * a, R, L, B), formed and cast once instead of per call (one fit step: v = Q u, Q r and the
        surrogate gradients). The parameters must not change inside the block."""
        self._held = (dtype, tuple(None if f is None else f.detach() for f in self._factors(dtype)))
        try:
            yield
        finally:
            self._held = None

    def _operands(self, *t: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """Probe inputs and factors (A, R, L, B), cast to ``dtype`` if given (else to the :meth:`held` one), as
        plain matrices when there is one probe and one layer in the stack (the common case): the products are
        then single ``mm`` calls instead of batched ones, which under oneDNN copy and zero-fill operands per
        call (a few percent of a fit step on the autoencoder)."""
        if self._held is not None and dtype in (None, self._held[0]):
            dtype, factors = self._held
        else:
            factors = self._factors(dtype)
        t = tuple(x if dtype is None else x.to(dtype) for x in t)
        if all(math.prod(x.shape[:-2]) == 1 for x in (self.a0, *t)):
            return tuple(x.reshape(x.shape[-2:]) for x in t), tuple(None if f is None else f.reshape(f.shape[-2:]) for f in factors)
        return tuple(_drop_unit_lead(x, self.a0.dim()) for x in t), factors

    @torch.no_grad()
    def surrogate_grads(
        self, u: torch.Tensor, c: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None,
        scale: float = 1.0, out: list[torch.Tensor | None] | None = None, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """scale * gradients of s = <c, Q u> w.r.t. (a, R, L[, b]), summed over leading probe dimensions, in
        the parameters' dtype. ``dtype``: compute in that dtype, as :meth:`products` (whose ``cache`` it takes).
        (``out`` is accepted for interface symmetry with :class:`BlockQ`; these gradients are small.)

        With X = A * u, Y = A * c, P_X = R X L, P_Y = R Y L (B = 1 without ``inner``), s = <P_Y, B * P_X>, so
        ds/dR = (B * P_Y)(X L)^T + (B * P_X)(Y L)^T, ds/dL = Y^T R^T (B * P_X) + X^T R^T (B * P_Y),
        ds/dA = c * K(X) + u * K(Y) with K(Z) = R^T (B * R Z L) L^T, ds/da = A0 * ds/dA and
        ds/db = 2 b B0 * P_X * P_Y.
        """
        if cache is None:
            cache = self.products(u, dtype)[1]
        xl, p, nxl, kx = cache
        (u, c), (A, R, L, B) = self._operands(u, c, dtype=dtype)
        c = c * scale  # s is linear in c
        x = A * u
        y = A * c
        yl = y @ L
        s = R @ yl
        bs, bp = (s, p) if B is None else (B * s, B * p)
        nyl = R.transpose(-1, -2) @ bs
        ky = nyl @ L.transpose(-1, -2)
        g_r = bs @ xl.transpose(-1, -2) + bp @ yl.transpose(-1, -2)
        g_l = y.transpose(-1, -2) @ nxl + x.transpose(-1, -2) @ nyl
        g_a = (c * kx + u * ky) * self.a0.reshape(A.shape).to(A.dtype)
        grads = [(g_a, self.a), (g_r, self.R), (g_l, self.L)]
        if self.inner:
            grads.append((p * s * (2.0 * self.b * self.b0).reshape(B.shape).to(B.dtype), self.b))  # type: ignore[union-attr]
        return tuple(_sum_to(g.to(param.dtype), param.shape).reshape(param.shape) for g, param in grads)

    def diag(self) -> torch.Tensor:
        return kron_diag(self.A, self.R, self.L, self.B)

    def row_inner(self) -> torch.Tensor | None:
        """:func:`kron_row_inner`; ``None`` without ``inner`` (then C_r = (R^T R)_rr, a scalar per row that
        cancels in the per-row OBS problem)."""
        return kron_row_inner(self.R, self.B) if self.inner else None

    def num_floats(self) -> int:
        extra = (self.b0, self.b) if self.inner else ()
        return sum(t.numel() for t in (self.a0, self.a, self.R, self.L, *extra))


class BlockQ(nn.Module):
    """Q = blockdiag(B_k B_k^T) over consecutive blocks of the row-major flattening of ``a0``.

    ``B_k`` starts as diag(a0 block) (the last block padded with the mean of ``a0``).
    """

    def __init__(self, a0: torch.Tensor, block_size: int = 50):
        super().__init__()
        self.shape = tuple(a0.shape)
        self.n = a0.numel()
        self.block = int(block_size)
        nblocks = math.ceil(self.n / self.block)
        pad = nblocks * self.block - self.n
        flat = a0.reshape(-1)
        init = torch.cat([flat, flat.new_full((pad,), float(flat.mean()) if self.n else 1.0)])
        self.B = nn.Parameter(torch.diag_embed(init.reshape(nblocks, self.block)))

    @property
    def num_blocks(self) -> int:
        return int(self.B.shape[0])

    # ---------------------------------------------------------------- blocked layout (k, b, probes)
    def to_blocks(self, u: torch.Tensor) -> torch.Tensor:
        """(*probes, *shape) -> (k, b, P) with P = prod(probes) (1 without probes)."""
        probes = u.shape[: u.dim() - len(self.shape)]
        flat = u.reshape(-1, self.n)
        pad = self.num_blocks * self.block - self.n
        if pad:
            flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], 1)
        return flat.reshape(flat.shape[0], self.num_blocks, self.block).permute(1, 2, 0), probes

    def from_blocks(self, x: torch.Tensor, probes: torch.Size | tuple) -> torch.Tensor:
        flat = x.permute(2, 0, 1).reshape(x.shape[2], -1)[:, : self.n]
        return flat.reshape(*probes, *self.shape)

    def blocked_products(self, x: torch.Tensor, blocks: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q x, B^T x) for blocked x (k, b, P), optionally only for a range of blocks.

        B^T x is computed as (x^T B)^T so that B is read row-major (several times faster on CPU).
        """
        B = self.B[blocks]
        t = torch.bmm(x.transpose(1, 2), B).transpose(1, 2)
        return torch.bmm(B, t), t

    def blocked_grad(
        self, xu: torch.Tensor, xc: torch.Tensor, tu: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """scale * d<c, B B^T u>/dB = scale * (c (B^T u)^T + u (B^T c)^T) per block, summed over probes.

        One bmm with inner dimension 2P, written into ``out`` if given (no B-sized temporaries).
        """
        tc_t = torch.bmm(xc.transpose(1, 2), self.B)
        left = torch.cat([xc, xu], 2) * scale
        right = torch.cat([tu.transpose(1, 2), tc_t], 1)
        return torch.bmm(left, right, out=out) if out is not None else torch.bmm(left, right)

    # ---------------------------------------------------------------- shaped interface
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x, probes = self.to_blocks(u)
        return self.from_blocks(self.blocked_products(x)[0], probes)

    def products(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        x, probes = self.to_blocks(u)
        y, t = self.blocked_products(x)
        return self.from_blocks(y, probes), (x, t)

    @torch.no_grad()
    def surrogate_grads(
        self, u: torch.Tensor, c: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None,
        scale: float = 1.0, out: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor]:
        """scale * gradient of s = <c, Q u> w.r.t. B (closed form, see :meth:`blocked_grad`)."""
        xu, tu = cache if cache is not None else self.products(u)[1]
        xc, _ = self.to_blocks(c)
        return (self.blocked_grad(xu, xc, tu, scale, None if out is None else out[0]),)

    def diag(self) -> torch.Tensor:
        return (self.B**2).sum(-1).reshape(-1)[: self.n].reshape(self.shape)

    def block_matrices(self) -> torch.Tensor:
        return self.B @ self.B.transpose(1, 2)

    def num_floats(self) -> int:
        return self.B.numel()
