"""M-FAC (static algorithm): an implicit inverse of the damped empirical Fisher from m gradients.

Paper: Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021, section 3 (static algorithm).

Math
----
F = gamma I + (1/m) sum_i g_i g_i^T over ALL prunable weights jointly (``scope="joint"``, the
default: d = total number of prunable weights, no d x d or block matrix is formed), or over each
weight separately (``scope="layer"``). The static algorithm represents F^-1 by m vectors

    v_1 = g_1 / gamma,   v_i = g_i / gamma - sum_{j<i} (v_j^T g_i / c_j) v_j,   c_i = m + g_i^T v_i,
    F^-1 = I / gamma - sum_i v_i v_i^T / c_i,

so diag(F^-1)_q = 1/gamma - sum_i v_iq^2 / c_i and F^-1 x = x / gamma - sum_i (v_i^T x / c_i) v_i,
both O(m d). The O(m^2 d) recursion is evaluated with level-3 BLAS instead of m sequential
matrix-vector sweeps: with K = G G^T (m x m Gram of the gradients, float64) and the Cholesky factor
L L^T = K + m gamma I, the rows of W = L^-1 G satisfy

    v_i / sqrt(c_i) = w_i / sqrt(gamma),   c_i = L_ii^2 / gamma,   v_i = (L_ii / gamma) w_i,

because both are the unique lower-triangular (Gram-Schmidt-ordered) factorisations of
G^T (m gamma I + G G^T)^-1 G (Woodbury: F^-1 = I/gamma - G^T (m gamma I + G G^T)^-1 G / gamma).
Hence F^-1 = (I - W^T W) / gamma; :meth:`MFACEstimator.vectors` returns the explicit (v_i, c_i)
of the recursion (tests check them against the literal recursion).

Cost: m per-example gradients (true labels; sampled labels if the data has none, with a warning),
O(m^2 d) for the Gram and the triangular solve, O(m d) memory (W overwrites the gradients), O(m d)
per diag / product. Memory is the limit: m * d floats must fit ``max_stored_floats`` (default 2e8,
~0.8 GB in float32); larger requests reduce m with a warning (a block-wise M-FAC does not help, its
storage is also m * d).

``ief=True`` builds the vectors from the improved-empirical-Fisher vectors g / ||r|| (Wu et al. 2024, eq. 8).

Interface note: :class:`InverseFisherEstimator.matvec` is per weight, so with ``scope="joint"`` it
returns the weight's diagonal block of the joint F^-1 applied to z (cross-layer terms of the OBS
update are dropped by the per-layer OBS loop); :meth:`MFACEstimator.matvec_joint` gives the full
joint product for a caller that wants them.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import InvalidOptionError
from .base import FitStats, InverseFisherEstimator
from .empirical_fisher import per_example_vectors, resolve_labels
from .problem import FisherProblem

log = logging.getLogger(__name__)


class MFACEstimator(InverseFisherEstimator):
    """Matrix-free inverse empirical Fisher (M-FAC static), joint over all prunable weights.

    Parameters
    ----------
    num_grads:
        m, number of per-example gradients (capped by the data size and by ``max_stored_floats``).
    damping / relative_damping:
        gamma absolute, or ``relative_damping`` x mean diag of (1/m) sum g g^T over surviving weights.
    scope:
        ``"joint"`` (one implicit inverse over every prunable weight) or ``"layer"`` (one per weight).
    ief:
        Use the iEF vectors g / ||r|| instead of the EF gradients.
    dtype:
        Storage dtype of the m x d representation; ``None`` = float64 up to 5e7 floats, else float32.
    """

    def __init__(
        self,
        num_grads: int = 256,
        damping: float | None = None,
        relative_damping: float = 0.1,
        *,
        scope: str = "joint",
        ief: bool = False,
        dtype: torch.dtype | None = None,
        max_stored_floats: float = 2e8,
    ):
        if num_grads < 1:
            raise InvalidOptionError(f"num_grads must be >= 1, got {num_grads}")
        if damping is not None and not damping > 0:
            raise InvalidOptionError(f"damping must be > 0, got {damping}")
        if not relative_damping > 0:
            raise InvalidOptionError(f"relative damping must be > 0, got {relative_damping}")
        if scope not in ("joint", "layer"):
            raise InvalidOptionError(f"M-FAC scope must be 'joint' or 'layer', got {scope!r}")
        self.num_grads = int(num_grads)
        self.damping = damping
        self.relative_damping = float(relative_damping)
        self.scope = scope
        self.ief = bool(ief)
        self.dtype = dtype
        self.max_stored_floats = float(max_stored_floats)
        self.name = "mfac-ief" if ief else "mfac"
        self.gamma: float = float("nan")
        self.m: int = 0
        self.w: dict[str, torch.Tensor] = {}  # name -> (m, numel) rows of L^-1 G
        self.chol: dict[str, torch.Tensor] = {}  # "joint" or name -> L (m x m, float64)
        self._diag: dict[str, torch.Tensor] = {}
        self._problem: FisherProblem | None = None

    # ---------------------------------------------------------------- fitting
    def fit(self, problem: FisherProblem) -> FitStats:
        t0 = time.perf_counter()
        self._problem = problem
        labels = resolve_labels(problem, self.name)
        names = problem.names
        d = sum(problem.weights[n].numel for n in names)
        m = min(self.num_grads, problem.num_samples)
        cap = max(int(self.max_stored_floats // max(d, 1)), 1)
        if m > cap:
            log.warning(
                "%s: m=%d gradients over d=%d weights exceed the memory budget of %.2g floats; using m=%d",
                self.name, m, d, self.max_stored_floats, cap,
            )
            m = cap
        self.m = m
        dtype = self.dtype or (torch.float64 if m * d <= 5e7 else torch.float32)
        g = {n: torch.zeros(m, problem.weights[n].numel, dtype=dtype) for n in names}
        count = 0
        for i, vec in enumerate(per_example_vectors(problem, m, ief=self.ief, labels=labels)):
            for n in names:
                g[n][i] = vec[n].reshape(-1).to(dtype)
            count = i + 1
        if count < m:  # cannot happen with iter_batches, kept for safety
            g = {n: t[:count] for n, t in g.items()}
            m = self.m = count
        # damping
        if self.damping is not None:
            gamma = float(self.damping)
        else:
            alive = sum(int(problem.masks[n].sum()) for n in names)
            sq = sum(float((t.double() ** 2).sum()) for t in g.values())
            gamma = self.relative_damping * sq / (m * max(alive, 1))
            if not gamma > 0:
                log.warning("%s: the empirical Fisher is zero; damping falls back to %g", self.name, self.relative_damping)
                gamma = self.relative_damping
        self.gamma = gamma
        # Gram matrices and Cholesky factors of K + m gamma I
        grams = {n: self._gram(t) for n, t in g.items()}
        eye = torch.eye(m, dtype=torch.float64)
        self.chol = {}
        if self.scope == "joint":
            k = sum(grams.values()) if grams else torch.zeros(m, m, dtype=torch.float64)
            self.chol["joint"] = torch.linalg.cholesky(k + m * gamma * eye)
        else:
            for n in names:
                self.chol[n] = torch.linalg.cholesky(grams[n] + m * gamma * eye)
        # W = L^-1 G, in place of G, in column chunks
        self.w = {}
        self._diag = {}
        for n in names:
            chol = self.chol["joint" if self.scope == "joint" else n]
            t = g[n]
            step = max(int(2e7 // max(m, 1)), 1)
            for s in range(0, t.shape[1], step):
                t[:, s : s + step] = torch.linalg.solve_triangular(chol, t[:, s : s + step].double(), upper=False).to(dtype)
            self.w[n] = t
            sumsq = torch.zeros(t.shape[1], dtype=torch.float64)
            for s in range(0, t.shape[1], step):
                sumsq[s : s + step] = (t[:, s : s + step].double() ** 2).sum(0)
            self._diag[n] = ((1.0 - sumsq) / gamma).reshape(problem.weights[n].parameter.shape)
        stats = FitStats(steps=m, seconds=time.perf_counter() - t0, samples=m)
        stats.extra["gamma"] = gamma
        stats.extra["num_grads"] = float(m)
        stats.extra["aux_floats"] = float(m * d)
        log.info("%s: m=%d, d=%d (%s), gamma=%.3e, %.1fs", self.name, m, d, self.scope, gamma, stats.seconds)
        return stats

    @staticmethod
    def _gram(t: torch.Tensor) -> torch.Tensor:
        m = t.shape[0]
        k = torch.zeros(m, m, dtype=torch.float64)
        step = max(int(2e7 // max(m, 1)), 1)
        for s in range(0, t.shape[1], step):
            c = t[:, s : s + step].double()
            k += c @ c.t()
        return k

    # ---------------------------------------------------------------- products
    def diag(self, name: str) -> torch.Tensor:
        problem = self._problem
        assert problem is not None, "fit() first"
        d = self._diag[name].to(problem.weights[name].parameter.dtype)
        return d.clamp_min(1e-12 * float(d.max().clamp_min(1e-30)))

    def matvec(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """(F^-1)_{ll} z for weight l (the weight's diagonal block of the joint inverse when joint)."""
        problem = self._problem
        assert problem is not None, "fit() first"
        w = self.w[name]
        x = z.detach().reshape(-1).to(w.dtype)
        y = (x - w.t() @ (w @ x)) / self.gamma
        return y.reshape(z.shape).to(z.dtype) * problem.masks[name]

    def matvec_joint(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full F^-1 z over all weights (cross-layer terms included when ``scope="joint"``)."""
        problem = self._problem
        assert problem is not None, "fit() first"
        if self.scope == "layer":
            return {n: self.matvec(n, z[n]) for n in self.w}
        coef = sum(self.w[n].double() @ z[n].detach().reshape(-1).double() for n in self.w)
        out = {}
        for n, w in self.w.items():
            x = z[n].detach().reshape(-1).double()
            out[n] = ((x - w.double().t() @ coef) / self.gamma).reshape(z[n].shape).to(z[n].dtype) * problem.masks[n]
        return out

    def vectors(self, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The recursion's (v_i as rows, c_i) (Frantar et al. 2021, eq. 5) for weight ``name`` (or all, concatenated)."""
        key = "joint" if self.scope == "joint" else name
        if key is None:
            raise ValueError("scope='layer' needs a weight name")
        chol = self.chol[key]
        diag = chol.diagonal()
        c = diag**2 / self.gamma
        names = [name] if name is not None else list(self.w)
        w = torch.cat([self.w[n].double() for n in names], dim=1)
        return (diag / self.gamma)[:, None] * w, c
