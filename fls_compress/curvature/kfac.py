"""Per-layer moments of per-example sampled-label gradients, used to initialise FishLeg's Q.

For the true Fisher F = E[g g^T] with g the per-example gradient under labels sampled from the model,
the diagonal is E[G * G] and a Kronecker approximation of the (out, in) matrix view G is

    F ~ (E[G G^T] kron E[G^T G]) / E||G||^2,

which for a dense layer with G = g x^T reduces to K-FAC's E[|x|^2 g g^T] kron E[|g|^2 x x^T]
(Martens & Grosse 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
section 3) and needs only the per-example gradients, so it works for every converted op type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import FisherProblem


@dataclass
class GradientMoments:
    """Per-layer statistics of per-example sampled-label gradients G_n (matrix view, out x in).

    ``diag`` = E[G * G] (parameter-shaped) is the exact diagonal of the true Fisher; ``left`` =
    E[G G^T] and ``right`` = E[G^T G] are the Kronecker factors; ``sq_norm`` = E||G||^2.
    """

    diag: dict[str, torch.Tensor]
    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]
    sq_norm: dict[str, float]


def gradient_moments(problem: FisherProblem, num_samples: int, kronecker: bool) -> GradientMoments:
    """Accumulate :class:`GradientMoments` over the first ``num_samples`` calibration examples.

    Per-example gradients come from :meth:`FisherProblem.per_example_gradient_batch` (one backward per
    batch when layer hooks cover every weight, one per example otherwise), layer by layer, so at most
    one layer's (batch, out, in) gradients are alive at a time.
    """
    diag = {n: torch.zeros_like(w.parameter, dtype=torch.float64) for n, w in problem.weights.items()}
    left: dict[str, torch.Tensor] = {}
    right: dict[str, torch.Tensor] = {}
    if kronecker:
        for n, w in problem.weights.items():
            o, i = w.matrix_shape
            opts = {"dtype": torch.float64, "device": w.parameter.device}
            left[n] = torch.zeros(o, o, **opts)
            right[n] = torch.zeros(i, i, **opts)
    count = 0
    for batch in problem.iter_batches(num_samples):
        grads = problem.per_example_gradient_batch(batch, labels="sampled")
        for n, w in problem.weights.items():
            factors = grads.factors(n) if kronecker and hasattr(grads, "factors") else None
            if factors is not None and _gram_is_cheaper(*factors):
                a, x = factors  # G_n = A_n^T X_n, A: (B, T, out), X: (B, T, in)
                o, i = a.shape[2], x.shape[2]
                # sum_n A_n^T (X_n X_n^T) A_n as one (out x BT) @ (BT x out) product, no per-example out x out
                left[n] += (a.reshape(-1, o).t() @ (x @ x.transpose(1, 2) @ a).reshape(-1, o)).double()
                right[n] += (x.reshape(-1, i).t() @ (a @ a.transpose(1, 2) @ x).reshape(-1, i)).double()
                if a.shape[1] == 1:  # one position: G_n * G_n = (a_n * a_n)(x_n * x_n)^T, summed by one product
                    a2, x2 = a[:, 0].double() ** 2, x[:, 0].double() ** 2
                    diag[n] += w.from_matrix(a2.t() @ x2)
                else:
                    diag[n] += w.from_matrix(((a.transpose(1, 2) @ x).double() ** 2).sum(0))
                continue
            g = grads[n].detach()  # (B, *parameter shape)
            diag[n] += (g.double() ** 2).sum(0)
            if kronecker:
                mats = torch.stack([w.to_matrix(gi) for gi in g])
                left[n] += torch.einsum("noi,npi->op", mats, mats).double()
                right[n] += torch.einsum("noi,noj->ij", mats, mats).double()
        count += batch.size
    count = max(count, 1)
    diag_mean = {n: (d / count).to(problem.weights[n].parameter.dtype) for n, d in diag.items()}
    sq = {n: float(d.sum()) / count for n, d in diag.items()}
    dtypes = {n: torch.promote_types(w.parameter.dtype, torch.float32) for n, w in problem.weights.items()}
    return GradientMoments(
        diag_mean,
        {n: (v / count).to(dtypes[n]) for n, v in left.items()},
        {n: (v / count).to(dtypes[n]) for n, v in right.items()},
        sq,
    )


def _gram_is_cheaper(a: torch.Tensor, x: torch.Tensor) -> bool:
    """G G^T = A^T (X X^T) A costs T^2 (in + out) + T out^2 per example, instead of forming G (T out in)
    and G G^T (out^2 in); likewise for G^T G. Worth it when the positions T are few (K-FAC's regime)."""
    t, o, i = a.shape[1], a.shape[2], x.shape[2]
    gram = 2 * t * t * (i + o) + t * (o * o + i * i) + t * o * i
    direct = t * o * i + o * o * i + o * i * i
    return gram < direct


def damped_inverse_factor(matrix: torch.Tensor, damping: float, lower: bool) -> torch.Tensor:
    """A factor X with X X^T (lower) or X^T X (upper) = (matrix + damping I)^{-1}, via eigh (float64)."""
    evals, evecs = torch.linalg.eigh(matrix.double())
    inv_sqrt = (evals.clamp_min(0.0) + damping).rsqrt()
    root = evecs * inv_sqrt  # root @ root.T = inverse
    return (root if lower else root.t()).to(matrix.dtype).contiguous()


def factored_damped_inverse(left: torch.Tensor, right: torch.Tensor, sq_norm: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L) with R^T R = (G + pi sqrt(gamma) I)^{-1}, L L^T = (X + sqrt(gamma)/pi I)^{-1}, G = left/s,
    X = right/s, s = sqrt(E||G||^2): K-FAC's factored Tikhonov damping, pi balancing the damping between
    the factors (Martens & Grosse 2015, section 6.3)."""
    scale = max(sq_norm, 1e-30) ** 0.5
    a, b = left / scale, right / scale
    pi = ((float(a.trace()) / a.shape[0]) / max(float(b.trace()) / b.shape[0], 1e-30)) ** 0.5
    pi = pi if pi > 0 else 1.0
    root = gamma**0.5
    return damped_inverse_factor(a, pi * root, lower=False), damped_inverse_factor(b, root / pi, lower=True)


def exact_damped_eigenbasis(
    left: torch.Tensor, right: torch.Tensor, sq_norm: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, L, B) with R^T (B * (R U L)) L^T = (G kron X + gamma I)^{-1} U exactly, G = left/s, X = right/s:
    G = U_G diag(g) U_G^T, X = U_X diag(x) U_X^T give R = U_G^T, L = U_X, B = 1 / (g_i x_j + gamma)
    (the eigenbasis of EKFAC, George et al. 2018, with K-FAC's eigenvalues)."""
    scale = max(sq_norm, 1e-30) ** 0.5
    g, u_g = torch.linalg.eigh(left.double() / scale)
    x, u_x = torch.linalg.eigh(right.double() / scale)
    inner = 1.0 / (g.clamp_min(0.0)[:, None] * x.clamp_min(0.0)[None, :] + gamma)
    dtype = left.dtype
    return u_g.t().to(dtype).contiguous(), u_x.to(dtype).contiguous(), inner.to(dtype)
