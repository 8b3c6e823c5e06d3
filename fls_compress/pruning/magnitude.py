"""Magnitude pruning (Han et al. 2015; global variant as in Zhu & Gupta 2017): saliency |w|.

The reference baseline: zero-cost, no data, no compensating update. ``--scope global`` ranks all
prunable weights together, ``--scope layer`` gives every layer the same sparsity.
"""

from __future__ import annotations

from ..curvature.problem import FisherProblem
from .base import ProgressFn, PruneResult, PruneStep, Pruner, SparsitySpec


class MagnitudePruner(Pruner):
    name = "magnitude"

    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        result = PruneResult(self.name, problem.masks)
        for target in spec.schedule():
            scores = {n: w.parameter.detach().abs() for n, w in problem.weights.items()}
            newly = spec.select(problem, scores, target)
            for n in problem.names:
                problem.masks[n] &= ~newly[n]
            problem.apply_masks()
            result.steps.append(PruneStep(target, problem.sparsity()))
            if progress:
                progress(f"magnitude: sparsity {problem.sparsity():.3f}")
        return result
