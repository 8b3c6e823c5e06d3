"""Common interface of the inverse-Fisher estimators used by Optimal Brain Surgeon pruning.

OBS (Hassibi & Stork 1993) needs two things from an approximation Q ~ F^{-1} (block-diagonal over
layers): the diagonal [Q]_qq, for the saliency rho_q = w_q^2 / (2 [Q]_qq), and products Q z, for the
compensating update delta = -Q z with z_q = w_q / [Q]_qq on the pruned set (Hassibi & Stork 1993, eq. 5).
Block estimators can also offer the exact group update inside a block (oBERT/WoodFisher).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .problem import FisherProblem


@dataclass
class FitStats:
    """What a fit did, for logs and reports."""

    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    history: list[float] = field(default_factory=list)
    extra: dict[str, float | str] = field(default_factory=dict)


class InverseFisherEstimator(ABC):
    """A per-layer (block-diagonal) approximation Q of the damped inverse Fisher (F + gamma I)^{-1}."""

    #: short method name used in reports and the CLI
    name: str = ""
    #: per-layer record of the OBS update used (e.g. {"update": "sweep", "in": 4608, "out": 512}); estimators
    #: that choose per layer set it in ``fit``
    layer_info: dict[str, dict]

    @abstractmethod
    def fit(self, problem: FisherProblem) -> FitStats:
        """Estimate Q at the current weights and masks (called once before the first pruning step)."""

    def refit(self, problem: FisherProblem) -> FitStats:
        """Update Q after a pruning step. Default: fit from scratch (FishLeg overrides with a warm start)."""
        return self.fit(problem)

    @abstractmethod
    def diag(self, name: str) -> torch.Tensor:
        """diag(Q) for one weight, shaped like the weight's parameter."""

    @abstractmethod
    def matvec(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Q z for one weight's block, ``z`` shaped like the parameter."""

    def block_exact_update(self, name: str, weight: torch.Tensor, prune: torch.Tensor) -> torch.Tensor | None:
        """Optional group-OBS update (exact inside blocks, or a column sweep): the change of ``weight``
        when the weights in ``prune`` (and all earlier-pruned ones) are held at zero. ``None`` means
        "use the decoupled update -Q z"."""
        return None
