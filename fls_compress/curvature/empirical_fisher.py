"""Block-wise empirical-Fisher inverse: WoodFisher / oBERT, and the "iEF surgeon".

Papers
------
* WoodFisher: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
  Compression", NeurIPS 2020.
* oBERT: Kurtic et al., "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning for
  Large Language Models", EMNLP 2022 (block size B = 50, m = 1024 gradients).
* iEF: Wu, Yu, Zhang, Woodland, "An Improved Empirical Fisher Approximation for Natural Gradient
  Descent", NeurIPS 2024 (arXiv 2406.06420), eq. 14 and App. D.2.3 eq. 45 (iEF inside WoodFisher).

Math (Singh & Alistarh 2020, WoodFisher, eqs. 7-9; Kurtic et al. 2022, oBERT, section 3; Wu et al. 2024, iEF, eq. 8)
------------------------------------------------------------
With m per-example vectors g_i (masked, so pruned coordinates carry nothing) the damped empirical
Fisher is

    F_hat = gamma I + (1/m) sum_i g_i g_i^T,

restricted to a block-diagonal form: every prunable weight's (out, in) matrix view is flattened
row-major and cut into consecutive blocks of ``block_size`` coordinates (the last one zero-padded; the
layout of :class:`~fls_compress.curvature.fishleg.BlockQ`). WoodFisher (Singh & Alistarh 2020, eq. 9)
builds each block's inverse by the rank-1 Woodbury (Sherman-Morrison) recursion from I / gamma,

    v = F^-1 g,     F^-1 <- F^-1 - v v^T / (m + g^T v).

Here the same matrix is computed in the order that is stable in float32 storage: the gradients are
folded into each block's Gram matrix, ``chunk_size`` at a time (one batched product per chunk over all
blocks of all weights, no Python loop over blocks),

    S_b <- S_b + G_b^T G_b          (G_b: c x B slice of the chunk's vectors),

and the damped blocks are inverted once at the end, in float64, by a batched Cholesky factorisation:
F_b^-1 = (gamma I + S_b / m)^-1. In exact arithmetic this equals the recursion; in float32 (the storage of
large models) the recursion's running inverse loses definiteness once a block's largest eigenvalue
exceeds gamma by ~1e7 (it subtracts nearly equal numbers: on the pretrained MiniLM encoder of
``benchmarks/transformer_encoder.py`` it failed outright), while a float32 Gram is off by rounding
relative to its own entries and the inverse is formed in float64. It is also cheaper for m >= B:
O(m d B) for the Grams plus O(d B^2) for the inverses, against O(m d B) with two products and a c x c
solve per chunk. A block whose damped Gram still does not factorise (rounding of a float32 Gram with a
tiny gamma) gets a diagonal jitter relative to its largest diagonal entry, raised until it does; the
count is logged as a warning and reported (``jittered_blocks``).

Damping gamma is absolute when given, else ``relative_damping * mean diag((1/m) sum g g^T)`` over
the surviving coordinates (the trace of the Grams, so one pass over the gradients suffices either way).

OBS quantities: diag(F^-1) for rho_q = w_q^2 / (2 [F^-1]_qq), F^-1 z for the decoupled update, and
:meth:`BlockFisherEstimator.block_exact_update`, the exact group-OBS update inside each block,
delta_b = -Q_b[:, P_b] (Q_b[P_b, P_b])^-1 theta_{P_b} (Hassibi & Stork 1993 group OBS; WoodFisher/oBERT block form).

iEF surgeon (the iEF vectors of Wu et al. 2024 inside OBS)
----------------------
With ``ief=True`` each gradient g_i is replaced by g~_i = J_i^T u_i, u_i = r_i / ||r_i||, where
r_i = d l_i / d z_i is the gradient of the example's NLL with respect to the model output (for
softmax cross-entropy r = p - e_y). g~_i is obtained by back-propagating the unit residual u_i from the
output (never by dividing a parameter gradient by a tiny number); ||r_i|| is clamped at 1e-12. Since
OBS is invariant to a global rescaling of the curvature, what changes is the per-sample reweighting
1 / ||r_i||^2 relative to the EF. Damping must be relative (the iEF scale differs from the EF's).

Labels: the EF uses the TRUE labels (``labels="true"``). Calibration data without labels (and no
``targets_from_input``) falls back to labels sampled from the model, with a logged warning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import torch

from ..errors import InvalidOptionError
from .base import FitStats, InverseFisherEstimator
from .problem import Batch, FisherProblem

log = logging.getLogger(__name__)

#: ||r|| below this is clamped (a zero residual would divide by zero).
RESIDUAL_FLOOR = 1e-12


# ------------------------------------------------------------------------------------------------
# Per-example vectors (EF and iEF), shared with M-FAC
# ------------------------------------------------------------------------------------------------
def resolve_labels(problem: FisherProblem, method: str) -> str:
    """``"true"`` when the calibration data has labels (or reconstruction targets), else ``"sampled"``."""
    if problem.labels is None and problem.targets_from_input is None:
        log.warning(
            "%s: the calibration data has no labels; using labels sampled from the model instead of true "
            "labels (the curvature becomes a Monte-Carlo Fisher, not the empirical Fisher)",
            method,
        )
        return "sampled"
    return "true"


def ief_vectors(
    problem: FisherProblem, batch: Batch, *, labels: str = "true"
) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Yield ``(g~_i, ||r_i||^2)`` per example: g~_i = J_i^T (r_i / ||r_i||), masked.

    r_i = d l_i / d z_i is the gradient of the example's NLL (``problem.likelihood.nll`` on a batch of
    one) with respect to the model output; the parameter vector is one vector-Jacobian product of the
    output with the unit residual, so no parameter gradient is ever divided by a small number.
    """
    params = problem.params
    names = problem.names
    for sub in batch.examples():
        out = problem.output(sub)
        loss = problem.likelihood.nll(out, problem.target(out, sub, labels))
        (resid,) = torch.autograd.grad(loss, out, retain_graph=True)
        sq = float((resid.detach().double() ** 2).sum())
        unit = resid.detach() / max(math.sqrt(sq), RESIDUAL_FLOOR)
        grads = torch.autograd.grad(out, params, grad_outputs=unit, allow_unused=True)
        yield (
            {
                n: (torch.zeros_like(p) if g is None else g.detach()) * problem.masks[n]
                for n, p, g in zip(names, params, grads)
            },
            sq,
        )


def per_example_vectors(
    problem: FisherProblem, num: int, *, ief: bool, labels: str
) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``num`` calibration examples' EF gradients (or iEF vectors), masked, in data order."""
    for batch in problem.iter_batches(num):
        if ief:
            for vec, _ in ief_vectors(problem, batch, labels=labels):
                yield vec
        else:
            for grads in problem.per_example_gradients(batch, labels=labels):
                yield {n: g.detach() for n, g in grads.items()}


# ------------------------------------------------------------------------------------------------
# Block layout (identical to BlockQ: row-major (out, in) matrix view, last block zero-padded)
# ------------------------------------------------------------------------------------------------
class BlockLayout:
    """Where each weight's blocks sit in the stacked (n_blocks, B, B) tensor."""

    def __init__(self, problem: FisherProblem, block_size: int):
        self.block = int(block_size)
        self.names = problem.names
        self.numel: dict[str, int] = {}
        self.offset: dict[str, int] = {}  # first block index of each weight
        self.nblocks: dict[str, int] = {}
        off = 0
        for n, w in problem.weights.items():
            self.numel[n] = w.numel
            self.nblocks[n] = math.ceil(w.numel / self.block)
            self.offset[n] = off
            off += self.nblocks[n]
        self.total_blocks = off

    def to_blocks(self, problem: FisherProblem, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Parameter-shaped tensor -> (nblocks, B) rows of its row-major matrix view."""
        flat = problem.weights[name].to_matrix(tensor).reshape(-1)
        pad = self.nblocks[name] * self.block - flat.numel()
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.reshape(-1, self.block)

    def from_blocks(self, problem: FisherProblem, name: str, blocks: torch.Tensor) -> torch.Tensor:
        w = problem.weights[name]
        mat = blocks.reshape(-1)[: self.numel[name]].reshape(w.matrix_shape)
        return w.from_matrix(mat)

    def flatten(self, problem: FisherProblem, vec: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """A dict of parameter-shaped tensors -> one (total_blocks, B) tensor."""
        return torch.cat([self.to_blocks(problem, n, vec[n].to(dtype)) for n in self.names])


def _auto_dtype(floats: int, dtype: torch.dtype | None, limit: float = 2.5e7) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if floats <= limit else torch.float32


def _jittered_cholesky(mats: torch.Tensor, scale: torch.Tensor, jit: torch.Tensor, message: str,
                       where: torch.Tensor | None = None) -> torch.Tensor:
    """Batched Cholesky factors of ``mats + jit_b * scale_b * I`` (I restricted to ``where`` when given).

    A matrix that does not factorise has its ``jit`` raised (0 -> 1e-12, else x100) and is retried on its
    own; above 1 a ``LinAlgError(message)`` is raised. ``jit`` (one per matrix) is updated in place, so
    the caller sees which matrices needed more than they started with."""
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    shift = eye if where is None else eye * where

    def attempt(sel: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        diag = shift if where is None else shift[sel]
        return torch.linalg.cholesky_ex(mats[sel] + (jit[sel] * scale[sel])[:, None, None] * diag)

    chol, info = attempt(slice(None))
    while bool((info != 0).any()):
        bad = info != 0
        jit[bad] = torch.where(jit[bad] > 0, jit[bad] * 100.0, 1e-12)
        if float(jit[bad].max()) > 1.0:
            raise torch.linalg.LinAlgError(message)
        chol[bad], info[bad] = attempt(bad)
    return chol


# ------------------------------------------------------------------------------------------------
class BlockFisherEstimator(InverseFisherEstimator):
    """oBERT / WoodFisher block-diagonal empirical-Fisher inverse (``ief=True``: the iEF surgeon).

    Parameters
    ----------
    num_grads:
        m, the number of per-example vectors (capped at the calibration-set size).
    block_size:
        B, the Fisher block size (oBERT: 50).
    damping / relative_damping:
        gamma absolute, or ``relative_damping`` x mean diag of the undamped estimate when ``damping`` is None.
    ief:
        Use the improved-empirical-Fisher vectors g / ||r|| (Wu et al. 2024, eq. 8) instead of the gradients.
    chunk_size:
        Gradients folded into the block Grams per batched product.
    dtype:
        Storage dtype of the Grams / inverse blocks; ``None`` picks float64 up to 2.5e7 floats, else float32.
    jitter:
        Relative diagonal jitter of the batched Cholesky solves in :meth:`block_exact_update`.
    """

    def __init__(
        self,
        num_grads: int = 256,
        block_size: int = 50,
        damping: float | None = None,
        relative_damping: float = 0.1,
        *,
        ief: bool = False,
        chunk_size: int = 16,
        dtype: torch.dtype | None = None,
        jitter: float = 1e-10,
    ):
        if num_grads < 1 or block_size < 1 or chunk_size < 1:
            raise InvalidOptionError("num_grads, block_size and chunk_size must be >= 1")
        if damping is not None and not damping > 0:
            raise InvalidOptionError(f"damping must be > 0, got {damping}")
        if not relative_damping > 0:
            raise InvalidOptionError(f"relative damping must be > 0, got {relative_damping}")
        self.num_grads = int(num_grads)
        self.block_size = int(block_size)
        self.damping = damping
        self.relative_damping = float(relative_damping)
        self.ief = bool(ief)
        self.chunk_size = int(chunk_size)
        self.dtype = dtype
        self.jitter = float(jitter)
        self.name = "ief" if ief else "obert"
        self.gamma: float = float("nan")
        self.m: int = 0
        self.finv: torch.Tensor | None = None  # (total_blocks, B, B)
        self.layout: BlockLayout | None = None
        self._problem: FisherProblem | None = None

    # ---------------------------------------------------------------- fitting
    def fit(self, problem: FisherProblem) -> FitStats:
        t0 = time.perf_counter()
        self._problem = problem
        labels = resolve_labels(problem, self.name)
        layout = BlockLayout(problem, self.block_size)
        self.layout = layout
        B = layout.block
        dtype = _auto_dtype(layout.total_blocks * B * B, self.dtype)
        m = min(self.num_grads, problem.num_samples)
        if m < self.num_grads:
            log.info("%s: only %d calibration samples, using m=%d gradients", self.name, m, m)
        self.m = m
        nb = layout.total_blocks
        gram = torch.zeros(nb, B, B, dtype=dtype)  # becomes the inverse blocks, in place
        buf = torch.empty(nb, min(self.chunk_size, m), B, dtype=dtype)  # (nb, c, B): G_b per block, one chunk
        filled = 0
        for vec in per_example_vectors(problem, m, ief=self.ief, labels=labels):
            buf[:, filled].copy_(layout.flatten(problem, vec, dtype).reshape(nb, B))
            filled += 1
            if filled == buf.shape[1]:
                gram.baddbmm_(buf.transpose(1, 2), buf)
                filled = 0
        if filled:
            part = buf[:, :filled]
            gram.baddbmm_(part.transpose(1, 2), part)
        del buf
        if self.damping is not None:
            gamma = float(self.damping)
        else:
            alive = sum(int(problem.masks[n].sum()) for n in layout.names)
            sq = float(gram.diagonal(dim1=1, dim2=2).sum(dtype=torch.float64))  # sum_i ||g_i||^2
            gamma = self.relative_damping * sq / (m * max(alive, 1))
            if not gamma > 0:
                log.warning("%s: the empirical Fisher is zero; damping falls back to %g", self.name, self.relative_damping)
                gamma = self.relative_damping
        self.gamma = gamma
        jittered = self._invert_in_place(gram, m, gamma)
        self.finv = gram
        if jittered:
            log.warning("%s: %d of %d damped Fisher blocks needed a diagonal jitter to factorise (damping %.3e is at "
                        "the rounding level of their %s Gram; method_info.jittered_blocks)",
                        self.name, jittered, nb, gamma, str(dtype).replace("torch.", ""))
        stats = FitStats(steps=m, seconds=time.perf_counter() - t0, samples=m)
        stats.extra["gamma"] = gamma
        stats.extra["num_grads"] = float(m)
        stats.extra["aux_floats"] = float(self.finv.numel())
        stats.extra["jittered_blocks"] = float(jittered)
        log.info("%s: %d blocks of %d, m=%d, gamma=%.3e, %.1fs", self.name, nb, B, m, gamma, stats.seconds)
        return stats

    @staticmethod
    def _invert_in_place(gram: torch.Tensor, m: int, gamma: float, slab: int = 4096) -> int:
        """gram[b] <- (gamma I + gram[b] / m)^-1 by float64 batched Cholesky, ``slab`` blocks at a time.

        Blocks that do not factorise get ``jit * max diag`` added (:func:`_jittered_cholesky`, jit from
        1e-12, x100 until they do). Returns how many blocks needed it."""
        jittered = 0
        for lo in range(0, gram.shape[0], slab):
            f = gram[lo : lo + slab].double()
            f = 0.5 * (f + f.transpose(1, 2)) / m
            f.diagonal(dim1=1, dim2=2).add_(gamma)
            jit = torch.zeros(f.shape[0], dtype=f.dtype)
            chol = _jittered_cholesky(f, f.diagonal(dim1=1, dim2=2).amax(dim=1), jit,
                                      "a damped empirical-Fisher block is not positive definite")
            jittered += int((jit > 0).sum())
            gram[lo : lo + slab] = torch.cholesky_inverse(chol).to(gram.dtype)
        return jittered

    # ---------------------------------------------------------------- products
    def _blocks_of(self, name: str) -> torch.Tensor:
        assert self.finv is not None and self.layout is not None, "fit() first"
        off = self.layout.offset[name]
        return self.finv[off : off + self.layout.nblocks[name]]

    def block_matrices(self, name: str) -> torch.Tensor:
        """The (nblocks, B, B) inverse blocks of one weight (row-major matrix-view layout)."""
        return self._blocks_of(name)

    def diag(self, name: str) -> torch.Tensor:
        problem = self._problem
        assert problem is not None and self.layout is not None
        d = self._blocks_of(name).diagonal(dim1=1, dim2=2)
        out = self.layout.from_blocks(problem, name, d).to(problem.weights[name].parameter.dtype)
        return out.clamp_min(1e-12 * float(out.max().clamp_min(1e-30)))

    def matvec(self, name: str, z: torch.Tensor) -> torch.Tensor:
        problem = self._problem
        assert problem is not None and self.layout is not None
        q = self._blocks_of(name)
        zb = self.layout.to_blocks(problem, name, z.detach().to(q.dtype))
        y = torch.bmm(q, zb.unsqueeze(-1)).squeeze(-1)
        out = self.layout.from_blocks(problem, name, y).to(z.dtype)
        return out * problem.masks[name]

    def block_exact_update(self, name: str, weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor | None:
        """Exact group OBS inside every block: delta_b = -Q_b[:, P_b] (Q_b[P_b, P_b])^-1 theta_{P_b}.

        Vectorised over blocks: A_b = Q_b restricted to P_b on P_b x P_b and the identity elsewhere
        (SPD), x_b = A_b^-1 (theta_b * 1_P) is (Q_PP)^-1 theta_P on P_b and 0 off it, delta_b = -Q_b x_b.
        Solved in float64 by a batched Cholesky with a small relative diagonal jitter; blocks without
        pruned coordinates give delta = 0. Pruned coordinates land exactly on -theta.
        """
        problem = self._problem
        assert problem is not None and self.layout is not None
        q = self._blocks_of(name).double()
        theta = self.layout.to_blocks(problem, name, weight.detach().double())
        p = self.layout.to_blocks(problem, name, prune.to(torch.float64)) > 0.5
        rows = p.any(dim=1)
        delta = torch.zeros_like(theta)
        if bool(rows.any()):
            qs, ps, ts = q[rows], p[rows], theta[rows]
            pp = (ps.unsqueeze(2) & ps.unsqueeze(1)).double()
            scale = qs.diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1e-300)
            base = qs * pp + torch.diag_embed((~ps).double())
            rhs = (ts * ps.double()).unsqueeze(-1)
            # float32 blocks with small damping can be indefinite at rounding level: the jitter (relative
            # to the block's largest diagonal entry) is raised only where the factorisation failed
            jit = torch.full_like(scale, self.jitter)
            chol = _jittered_cholesky(base, scale, jit, f"{self.name}: inverse-Fisher block of {name!r} is not PSD", where=pp)
            if float(jit.max()) > self.jitter:
                log.debug("%s: jitter raised to %.1e on %s", self.name, float(jit.max()), name)
            x = torch.bmm(torch.cholesky_inverse(chol), rhs)
            delta[rows] = -torch.bmm(qs, x).squeeze(-1)
        out = self.layout.from_blocks(problem, name, delta).to(weight.dtype)
        return out

    def dense_block(self, name: str) -> torch.Tensor:
        """Explicit Q over the parameter's row-major flattening (tests; small layers only)."""
        problem = self._problem
        assert problem is not None
        w = problem.weights[name]
        eye = torch.eye(w.numel, dtype=torch.float64)
        cols = [self.matvec(name, eye[i].reshape(w.parameter.shape).to(torch.float64)).reshape(-1) for i in range(w.numel)]
        return torch.stack(cols, 1)
