"""Optimal Brain Surgeon pruning with any inverse-Fisher estimator (FLS, oBERT, M-FAC, iEF).

OBS (Hassibi & Stork 1993; LeCun et al. 1990 for the diagonal case): with the local model
dL ~ 1/2 d^T F d around trained weights (gradient term ~ 0), removing weight q costs

    rho_q = w_q^2 / (2 [F^{-1}]_qq)

and the optimal compensation of the survivors is d = -(w_q / [F^{-1}]_qq) F^{-1} e_q. FishLeg Surgeon
(McGowan et al., 2412.02328) replaces F^{-1} with the learned Q(lambda) ~ (F + gamma I)^{-1}.

For a set P removed at once the default is the decoupled ("independent OBS") update, one Q-product per
layer: z_q = w_q / Q_qq on P, d = -Q z, then hard-zero P. Estimators may instead return a group update
(``block_exact_update``): the exact d = -Q[:,P] (Q_PP)^{-1} w_P inside dense blocks (oBERT, Kurtic et
al. 2022), or the OBS column sweep of :mod:`.sweep` (FLS with the Kronecker Q).
High sparsities are reached in ``spec.steps`` sub-steps with the estimator refitted in between
(progressive assimilation for FishLeg, re-estimation for the others).
"""

from __future__ import annotations

import logging

import torch

from ..curvature.base import InverseFisherEstimator
from ..curvature.problem import FisherProblem
from .base import ProgressFn, PruneResult, PruneStep, Pruner, SparsitySpec

log = logging.getLogger(__name__)


def obs_scores(problem: FisherProblem, estimator: InverseFisherEstimator) -> dict[str, torch.Tensor]:
    """rho = w^2 / (2 diag Q) for every prunable weight."""
    return {
        n: w.parameter.detach() ** 2 / (2.0 * estimator.diag(n))
        for n, w in problem.weights.items()
    }


def obs_update(problem: FisherProblem, estimator: InverseFisherEstimator, newly: dict[str, torch.Tensor]) -> None:
    """Apply the OBS compensation for the weights in ``newly`` and zero them (updates masks)."""
    with torch.no_grad():
        for n, w in problem.weights.items():
            prune = newly[n]
            if not bool(prune.any()):
                continue
            theta = w.parameter
            exact = estimator.block_exact_update(n, theta.detach(), prune)
            if exact is None:
                z = torch.where(prune, theta / estimator.diag(n), torch.zeros_like(theta))
                delta = -estimator.matvec(n, z)
            else:
                delta = exact
            problem.masks[n] &= ~prune
            theta.add_(delta * problem.masks[n])
        problem.apply_masks()


class OBSPruner(Pruner):
    """Multi-step OBS pruning driven by an :class:`InverseFisherEstimator`."""

    def __init__(self, estimator: InverseFisherEstimator):
        self.estimator = estimator
        self.name = estimator.name

    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        result = PruneResult(self.name, problem.masks)
        for k, target in enumerate(spec.schedule()):
            stats = self.estimator.fit(problem) if k == 0 else self.estimator.refit(problem)
            scores = obs_scores(problem, self.estimator)
            newly = spec.select(problem, scores, target)
            obs_update(problem, self.estimator, newly)
            aux = stats.history[-1] if stats.history else None
            result.steps.append(PruneStep(target, problem.sparsity(), stats.seconds, aux))
            for key, val in stats.extra.items():
                result.info.setdefault(key, val)
            log.info("%s step %d: target %.4f reached %.4f (fit %.1fs)", self.name, k + 1, target, problem.sparsity(), stats.seconds)
            if progress:
                progress(f"{self.name}: step {k + 1}/{len(spec.schedule())}, sparsity {problem.sparsity():.3f}")
        layer_info = getattr(self.estimator, "layer_info", None) or {}
        updates = sorted({str(i.get("update")) for i in layer_info.values()})
        if updates:
            result.info.setdefault("obs_update", ",".join(updates))
        return result
