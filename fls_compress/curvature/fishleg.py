"""FishLeg: an amortised, learned inverse Fisher Q(lambda) (Garcia, Sutton, Lim, Nickl, ICLR 2023),
used as the curvature of the FishLeg Surgeon (FLS; McGowan et al., arXiv 2412.02328).

Auxiliary loss (FLS memo section 2.1). For probes u, FishLeg minimises over lambda

    A(lambda; u) = 1/2 u^T Q F_gamma Q u - u^T Q u,      F_gamma = F + gamma I,

whose minimiser (for E[u u^T] > 0) is Q = F_gamma^{-1}: completing the square gives
A = 1/2 ||Q u - F_gamma^{-1} u||^2_{F_gamma} - const. With Gaussian probes u ~ N(0, I) and a
layer-block-diagonal Q, each block targets (F_ll + gamma I)^{-1} (memo section 2.2).

Gradient (memo 2.3): with v = Q u and r = F_gamma v - u, grad_lambda A = J_lambda^T r, obtained by
back-propagating the surrogate <sg[r], Q(lambda) u>. The preconditioned variant (memo 2.4, the
"one extra product" of FLS Algorithm 1) back-propagates <sg[Q r], Q(lambda) u>, which makes every
error mode decay at the same rate near the optimum. F v is the exact GGN product of
:meth:`FisherProblem.fisher_vp` with labels sampled from the model, so unlabelled data suffices.

Q forms (PSD by construction, memo section 3):

* :class:`KroneckerQ`: Q = D_A (R^T R kron L L^T) D_A on the (out, in) matrix view, i.e.
  Q . U = A * (R^T R (A * U) L L^T). diag(Q)[a, b] = A_ab^2 ||R_{:,a}||^2 ||L_{b,:}||^2.
* :class:`BlockQ`: the row-major flattened weight split into blocks of ``block_size`` (last one padded),
  Q = blockdiag(B_k B_k^T); exact group OBS inside a block is cheap.

Initialisation: ``"identity"`` gives Q0 = I / gamma (the papers' choice, memo 2.6); ``"diag"`` gives
Q0 = diag(1 / (diag F + gamma)) from per-example sampled-label gradients; ``"kfac"`` (default, Kronecker
form) sets R^T R and L L^T to the damped inverses of the Kronecker factors E[G G^T], E[G^T G] of the
per-example gradients G (see :class:`GradientMoments`), so the auxiliary-loss fit starts from a
K-FAC-like point and only has to correct it. On the MNIST autoencoder the kfac start is what makes FLS
beat magnitude pruning; a diagonal start without compensation (OBD) is worse than magnitude at 90%.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InvalidOptionError
from .base import FitStats, InverseFisherEstimator
from .problem import FisherProblem

log = logging.getLogger(__name__)


class KroneckerQ(nn.Module):
    """Q = D_A (R^T R kron L L^T) D_A acting on an (out, in) matrix; A = A0 * a with a learnable."""

    def __init__(self, a0: torch.Tensor):
        super().__init__()
        out_f, in_f = a0.shape
        self.register_buffer("a0", a0.clone())
        self.a = nn.Parameter(torch.ones_like(a0))
        self.R = nn.Parameter(torch.eye(out_f, dtype=a0.dtype))
        self.L = nn.Parameter(torch.eye(in_f, dtype=a0.dtype))

    @property
    def A(self) -> torch.Tensor:
        return self.a0 * self.a

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        A = self.A
        x = A * u
        x = self.R.t() @ (self.R @ x)
        x = (x @ self.L) @ self.L.t()
        return A * x

    def diag(self) -> torch.Tensor:
        col_r = (self.R**2).sum(0)  # ||R_{:,a}||^2
        row_l = (self.L**2).sum(1)  # ||L_{b,:}||^2
        return self.A**2 * col_r[:, None] * row_l[None, :]

    def num_floats(self) -> int:
        return sum(t.numel() for t in (self.a0, self.a, self.R, self.L))


class BlockQ(nn.Module):
    """Q = blockdiag(B_k B_k^T) over consecutive blocks of the row-major flattened (out, in) matrix."""

    def __init__(self, a0: torch.Tensor, block_size: int = 50):
        super().__init__()
        self.shape = tuple(a0.shape)
        self.n = a0.numel()
        self.block = int(block_size)
        nblocks = math.ceil(self.n / self.block)
        pad = nblocks * self.block - self.n
        init = torch.cat([a0.reshape(-1), torch.ones(pad, dtype=a0.dtype) * a0.reshape(-1).mean()])
        self.B = nn.Parameter(torch.diag_embed(init.reshape(nblocks, self.block)))

    def _blocks(self, u: torch.Tensor) -> torch.Tensor:
        flat = u.reshape(-1)
        pad = self.B.shape[0] * self.block - self.n
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.reshape(-1, self.block)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self._blocks(u)
        y = torch.einsum("kij,kj->ki", self.B, torch.einsum("kji,kj->ki", self.B, x))
        return y.reshape(-1)[: self.n].reshape(self.shape)

    def diag(self) -> torch.Tensor:
        return (self.B**2).sum(-1).reshape(-1)[: self.n].reshape(self.shape)

    def block_matrices(self) -> torch.Tensor:
        return self.B @ self.B.transpose(1, 2)

    def num_floats(self) -> int:
        return self.B.numel()


@dataclass
class FishLegConfig:
    """Hyper-parameters of the FishLeg inverse-Fisher fit (defaults discussed in the FLS memo section 5).

    damping: absolute gamma on the per-example NLL scale, or ``None`` for ``relative_damping`` times the
        mean diagonal Fisher of the prunable weights (measured at fit time).
    """

    form: str = "kron"  # "kron" | "block"
    block_size: int = 50
    damping: float | None = None
    relative_damping: float = 0.1
    init: str = "kfac"  # "kfac" | "diag" | "identity"
    fit_steps: int = 50
    refit_steps: int = 20
    aux_batch: int = 32
    lr: float = 3e-3
    final_lr_fraction: float = 0.1
    precondition: bool = True
    update: str = "row-exact"  # "row-exact" | "decoupled" (Kronecker form; block form is always decoupled)
    row_exact_max_in: int = 2048  # wider layers fall back to the decoupled update
    diag_samples: int = 128
    clamp: float = 1e-12

    def validate(self) -> None:
        if self.form not in ("kron", "block"):
            raise InvalidOptionError(f"FishLeg form must be 'kron' or 'block', got {self.form!r}")
        if self.init not in ("diag", "identity", "kfac"):
            raise InvalidOptionError(f"FishLeg init must be 'kfac', 'diag' or 'identity', got {self.init!r}")
        if self.damping is not None and not self.damping > 0:
            raise InvalidOptionError(f"damping must be > 0, got {self.damping}")
        if not self.relative_damping > 0:
            raise InvalidOptionError(f"relative damping must be > 0, got {self.relative_damping}")
        if self.fit_steps < 0 or self.refit_steps < 0 or self.aux_batch < 1 or self.block_size < 1:
            raise InvalidOptionError("FishLeg steps must be >= 0, aux batch and block size >= 1")
        if self.update not in ("row-exact", "decoupled"):
            raise InvalidOptionError(f"FishLeg update must be 'row-exact' or 'decoupled', got {self.update!r}")


@dataclass
class GradientMoments:
    """Per-layer statistics of per-example sampled-label gradients G_n (matrix view, out x in).

    ``diag`` = E[G * G] is the exact diagonal of the true Fisher; ``left`` = E[G G^T] and ``right`` =
    E[G^T G] give the Kronecker approximation F ~ (left kron right) / E||G||^2, which for a dense layer
    with G = g x^T reduces to K-FAC's E[|x|^2 g g^T] kron E[|g|^2 x x^T] (Martens & Grosse 2015), but
    needs no layer hooks, so it works for every converted op type (Conv, Gemm, MatMul).
    """

    diag: dict[str, torch.Tensor]
    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]
    sq_norm: dict[str, float]


def gradient_moments(problem: FisherProblem, num_samples: int, kronecker: bool) -> GradientMoments:
    """Accumulate :class:`GradientMoments` over ``num_samples`` calibration examples."""
    diag = {n: torch.zeros_like(w.parameter) for n, w in problem.weights.items()}
    left: dict[str, torch.Tensor] = {}
    right: dict[str, torch.Tensor] = {}
    if kronecker:
        for n, w in problem.weights.items():
            o, i = w.matrix_shape
            left[n] = torch.zeros(o, o)
            right[n] = torch.zeros(i, i)
    count = 0
    for batch in problem.iter_batches(num_samples):
        chunk: dict[str, list[torch.Tensor]] = {n: [] for n in problem.weights}
        for grads in problem.per_example_gradients(batch, labels="sampled"):
            for n, g in grads.items():
                diag[n] += g.detach() ** 2
                if kronecker:
                    chunk[n].append(problem.weights[n].to_matrix(g.detach()))
            count += 1
        if kronecker:
            for n, mats in chunk.items():
                stacked = torch.stack(mats)
                left[n] += torch.einsum("noi,npi->op", stacked, stacked)
                right[n] += torch.einsum("noi,noj->ij", stacked, stacked)
    count = max(count, 1)
    diag = {n: d / count for n, d in diag.items()}
    sq = {n: float(d.sum()) for n, d in diag.items()}
    return GradientMoments(diag, {n: v / count for n, v in left.items()}, {n: v / count for n, v in right.items()}, sq)


def _damped_inverse_factor(matrix: torch.Tensor, damping: float, lower: bool) -> torch.Tensor:
    """A factor X with X X^T (lower) or X^T X (upper) = (matrix + damping I)^{-1}, via eigh (float64)."""
    evals, evecs = torch.linalg.eigh(matrix.double())
    inv_sqrt = (evals.clamp_min(0.0) + damping).rsqrt()
    root = evecs * inv_sqrt  # root @ root.T = inverse
    return (root if lower else root.t()).float().contiguous()


class FishLegEstimator(InverseFisherEstimator):
    """Learned block-diagonal inverse Fisher; refits warm-start from the current lambda."""

    name = "fls"

    def __init__(self, config: FishLegConfig | None = None):
        self.config = config or FishLegConfig()
        self.config.validate()
        self.modules: dict[str, nn.Module] = {}
        self.gamma: float = float("nan")
        self._problem: FisherProblem | None = None

    # ---------------------------------------------------------------- construction
    def _build(self, problem: FisherProblem) -> FitStats:
        cfg = self.config
        stats = FitStats()
        t0 = time.perf_counter()
        moments: GradientMoments | None = None
        if cfg.init != "identity" or cfg.damping is None:
            moments = gradient_moments(problem, cfg.diag_samples, kronecker=cfg.init == "kfac" and cfg.form == "kron")
            stats.samples += min(cfg.diag_samples, problem.num_samples)
        diag_f = None if moments is None else moments.diag
        if cfg.damping is not None:
            self.gamma = float(cfg.damping)
        else:
            total = sum(float(d.sum()) for d in diag_f.values())  # type: ignore[union-attr]
            count = sum(d.numel() for d in diag_f.values())  # type: ignore[union-attr]
            self.gamma = max(cfg.relative_damping * total / max(count, 1), 1e-12)
        self.modules = {}
        for n, w in problem.weights.items():
            shape = w.matrix_shape
            if cfg.init == "diag":
                a0 = (w.to_matrix(diag_f[n]) + self.gamma).rsqrt()  # type: ignore[index]
            elif cfg.init == "kfac":
                a0 = torch.ones(shape) if cfg.form == "kron" else (w.to_matrix(diag_f[n]) + self.gamma).rsqrt()  # type: ignore[index]
            else:
                a0 = torch.full(shape, self.gamma**-0.5)
            a0 = a0.to(torch.float32).contiguous()
            if cfg.form == "kron":
                q = KroneckerQ(a0)
                if cfg.init == "kfac":
                    self._kfac_init(q, moments.left[n], moments.right[n], moments.sq_norm[n])  # type: ignore[union-attr]
                self.modules[n] = q
            else:
                self.modules[n] = BlockQ(a0, cfg.block_size)
        stats.seconds = time.perf_counter() - t0
        stats.extra["gamma"] = self.gamma
        stats.extra["aux_floats"] = float(sum(m.num_floats() for m in self.modules.values()))
        return stats

    def _kfac_init(self, q: KroneckerQ, left: torch.Tensor, right: torch.Tensor, sq_norm: float) -> None:
        """R^T R = (left/s + pi sqrt(gamma) I)^{-1}, L L^T = (right/s + sqrt(gamma)/pi I)^{-1}, s = sqrt(E||G||^2).

        pi balances the damping between the factors (Martens & Grosse 2015, section 6.3).
        """
        scale = max(sq_norm, 1e-30) ** 0.5
        a, b = left / scale, right / scale
        pi = ((float(a.trace()) / a.shape[0]) / max(float(b.trace()) / b.shape[0], 1e-30)) ** 0.5
        pi = pi if pi > 0 else 1.0
        root = self.gamma**0.5
        with torch.no_grad():
            q.R.copy_(_damped_inverse_factor(a, pi * root, lower=False))
            q.L.copy_(_damped_inverse_factor(b, root / pi, lower=True))

    # ---------------------------------------------------------------- products
    def _apply(self, name: str, problem: FisherProblem, u: torch.Tensor) -> torch.Tensor:
        """Q_l u for a parameter-shaped u, masked to the surviving weights."""
        w = problem.weights[name]
        q = self.modules[name]
        return w.from_matrix(q(w.to_matrix(u))) * problem.masks[name]

    def diag(self, name: str) -> torch.Tensor:
        w = self._problem.weights[name]  # type: ignore[union-attr]
        with torch.no_grad():
            d = w.from_matrix(self.modules[name].diag())
        return d.clamp_min(self.config.clamp * float(d.max().clamp_min(1e-30)))

    def matvec(self, name: str, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._apply(name, self._problem, z)  # type: ignore[arg-type]

    def block_exact_update(self, name: str, weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor | None:
        """Row-wise exact group OBS with the Kronecker Q (``update="row-exact"``).

        Within output row r, Q_r = (R^T R)_rr D_{A_r} (L L^T) D_{A_r}; the scalar (R^T R)_rr cancels, so
        with H0 = (L L^T)^{-1} the exact OBS solution that zeroes every removed weight P of the row (newly
        and previously pruned) while moving the kept ones K is

            w_P = 0,   w_K = theta_K + D_K (H0_KK)^{-1} H0_KP (theta_P / A_P)

        (OBC, Frantar & Alistarh 2022, with FishLeg's learned factor in place of the layer Hessian).
        Cross-row terms of R^T R are dropped, unlike the decoupled update, which keeps them but treats the
        pruned weights independently.
        """
        if self.config.form != "kron" or self.config.update != "row-exact":
            return None
        problem = self._problem
        assert problem is not None
        w = problem.weights[name]
        if w.matrix_shape[1] > self.config.row_exact_max_in:
            # each row needs a dense solve over its kept inputs: O(in^3) per row is too much for very
            # wide inputs (e.g. 3x3x512 convs), where the decoupled update is used instead
            return None
        q = self.modules[name]
        theta = w.to_matrix(weight).double()
        new = w.to_matrix(prune)
        gone = w.to_matrix(~problem.masks[name]) | new
        L = q.L.detach().double()
        h0 = torch.linalg.inv(L @ L.t())
        h0 = 0.5 * (h0 + h0.t())
        scale = q.A.detach().double()
        delta = torch.zeros_like(theta)
        for r in torch.nonzero(new.any(1)).flatten().tolist():
            removed = gone[r]
            kept = ~removed
            delta[r, removed] = -theta[r, removed]
            if not bool(kept.any()):
                continue
            x = theta[r, removed] / scale[r, removed]
            rhs = h0[kept][:, removed] @ x
            sol = torch.linalg.solve(h0[kept][:, kept], rhs)
            delta[r, kept] = scale[r, kept] * sol
        return w.from_matrix(delta.to(weight.dtype))

    # ---------------------------------------------------------------- fitting
    def aux_step(self, problem: FisherProblem, optimizer: torch.optim.Optimizer) -> float:
        """One auxiliary-loss step (FLS Algorithm 1). Returns the normalised auxiliary loss A/||u||^2."""
        batch = problem.next_batch(self.config.aux_batch)
        names = problem.names
        u = {
            n: torch.randn(problem.weights[n].parameter.shape, generator=problem.generator) * problem.masks[n]
            for n in names
        }
        v = {n: self._apply(n, problem, u[n]) for n in names}
        fv = problem.fisher_vp(batch, {n: v[n].detach() for n in names})
        norm = sum(float((x**2).sum()) for x in u.values())
        surrogate = torch.zeros(())
        aux = 0.0
        for n in names:
            vd = v[n].detach()
            h = fv[n] + self.gamma * vd
            r = h - u[n]
            aux += float(0.5 * (vd * h).sum() - (u[n] * vd).sum())
            if self.config.precondition:
                with torch.no_grad():
                    r = self._apply(n, problem, r)
            surrogate = surrogate + (r.detach() * v[n]).sum()
        optimizer.zero_grad(set_to_none=True)
        (surrogate / norm).backward()
        optimizer.step()
        return aux / norm

    def _param_groups(self) -> list[dict]:
        """Adam groups with the learning rate scaled by 1/sqrt(dim) for the d x d factors.

        Adam moves every coordinate by ~lr per step, so a d x d factor moves by ~lr sqrt(d) in spectral
        norm; without the scaling, large layers (d ~ 1000) blow Q up within a few steps.
        """
        groups = []
        for q in self.modules.values():
            for p in q.parameters():
                dim = p.shape[-1] if p.dim() >= 2 else 1
                groups.append({"params": [p], "lr": self.config.lr / math.sqrt(dim)})
        return groups

    def _optimise(self, problem: FisherProblem, steps: int, stats: FitStats) -> FitStats:
        """Adam on the auxiliary loss with a linear lr decay.

        The step is accepted only if it lowers the auxiliary loss on a fixed validation set of probes
        and samples (the per-step loss is far too noisy to judge); otherwise the previous lambda is kept.
        This guards against the divergence of FLS memo pitfall 13.
        """
        if steps == 0:
            return stats
        start_state = {n: {k: v.clone() for k, v in q.state_dict().items()} for n, q in self.modules.items()}
        before = self.validation_loss(problem)
        opt = torch.optim.Adam(self._param_groups())
        final = self.config.final_lr_fraction
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - (1.0 - final) * k / max(steps - 1, 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            stats.history.append(self.aux_step(problem, opt))
            sched.step()
        after = self.validation_loss(problem)
        stats.extra["validation_aux_loss_before"] = before
        stats.extra["validation_aux_loss_after"] = after
        if not after < before:
            log.info("FishLeg fit did not lower the validation auxiliary loss (%.4g -> %.4g); keeping the previous Q", before, after)
            for n, q in self.modules.items():
                q.load_state_dict(start_state[n])
            stats.extra["reverted"] = 1.0
        stats.steps += steps
        stats.samples += steps * min(self.config.aux_batch, problem.num_samples)
        stats.seconds += time.perf_counter() - t0
        return stats

    def validation_loss(self, problem: FisherProblem, probes: int = 4) -> float:
        """A(lambda) = sum_u [1/2 v^T F_gamma v - u^T v] / ||u||^2, v = Q u, on fixed probes and samples."""
        gen = torch.Generator().manual_seed(problem.seed + 7919)
        batch = problem.batch_from_indices(np.arange(min(self.config.aux_batch * 2, problem.num_samples)))
        saved = problem.generator.get_state()
        total = 0.0
        with torch.no_grad():
            us = [{n: torch.randn(problem.weights[n].parameter.shape, generator=gen) * problem.masks[n] for n in problem.names} for _ in range(probes)]
            vs = [{n: self._apply(n, problem, u[n]) for n in problem.names} for u in us]
        for u, v in zip(us, vs):
            problem.generator.manual_seed(problem.seed + 104729)  # the same sampled labels every time
            fv = problem.fisher_vp(batch, v)
            norm = sum(float((x**2).sum()) for x in u.values())
            total += sum(float(0.5 * (v[n] * (fv[n] + self.gamma * v[n])).sum() - (u[n] * v[n]).sum()) for n in problem.names) / norm
        problem.generator.set_state(saved)
        return total / probes

    def fit(self, problem: FisherProblem) -> FitStats:
        self._problem = problem
        stats = self._build(problem)
        return self._optimise(problem, self.config.fit_steps, stats)

    def refit(self, problem: FisherProblem) -> FitStats:
        """Progressive assimilation: continue the lambda optimisation on the masked model (memo 4.5)."""
        if not self.modules:
            return self.fit(problem)
        self._problem = problem
        return self._optimise(problem, self.config.refit_steps, FitStats())

    def dense_block(self, name: str) -> torch.Tensor:
        """Explicit Q_l as a matrix over the parameter's row-major flattening (tests; small layers only)."""
        w = self._problem.weights[name]  # type: ignore[union-attr]
        n = w.numel
        eye = torch.eye(n)
        with torch.no_grad():
            cols = [self._apply(name, self._problem, eye[i].reshape(w.parameter.shape)).reshape(-1) for i in range(n)]
        return torch.stack(cols, 1)
