"""Pruner interface and the sparsity specification shared by every method."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..curvature.problem import FisherProblem
from ..errors import InvalidOptionError
from .selection import parse_pattern, select_global, select_n_of_m, select_per_layer

ProgressFn = Callable[[str], None]


@dataclass
class SparsitySpec:
    """What to reach: overall unstructured sparsity (``scope`` global or per layer), or an N:M pattern."""

    sparsity: float = 0.5
    scope: str = "global"  # "global" | "layer"
    pattern: str | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity)):
            raise InvalidOptionError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidOptionError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("global", "layer"):
            raise InvalidOptionError(f"scope must be 'global' or 'layer', got {self.scope!r}")
        if self.steps < 1:
            raise InvalidOptionError(f"steps must be >= 1, got {self.steps}")
        self.nm = parse_pattern(self.pattern)
        if self.nm is not None:
            self.sparsity = self.nm[0] / self.nm[1]

    def schedule(self) -> list[float]:
        """Intermediate targets s_1 < ... < s_K = s removing a constant fraction of the survivors per step.

        s_k = 1 - (1 - s)^(k/K): with K sub-steps each step keeps (1-s)^(1/K) of the remaining weights,
        which keeps every OBS update small (the multi-step one-shot regime of WoodFisher/M-FAC).
        """
        if self.nm is not None:
            return [self.sparsity]
        k = self.steps
        return [1.0 - (1.0 - self.sparsity) ** ((i + 1) / k) for i in range(k)]

    def select(
        self, problem: FisherProblem, scores: dict[str, torch.Tensor], target: float
    ) -> dict[str, torch.Tensor]:
        """Weights to prune now (boolean tensors) for intermediate target ``target``."""
        masked = {n: torch.where(problem.masks[n], s, torch.full_like(s, float("inf"))) for n, s in scores.items()}
        if self.nm is not None:
            return select_n_of_m(masked, problem.masks, problem.weights, *self.nm)
        if self.scope == "layer":
            return select_per_layer(masked, problem.masks, target)
        return select_global(masked, problem.masks, target)


@dataclass
class PruneStep:
    target: float
    achieved: float
    fit_seconds: float = 0.0
    aux_loss: float | None = None


@dataclass
class PruneResult:
    """Outcome of a pruning run: the final masks (weights are updated in place) and per-step stats."""

    method: str
    masks: dict[str, torch.Tensor]
    steps: list[PruneStep] = field(default_factory=list)
    info: dict[str, float | str] = field(default_factory=dict)


class Pruner(ABC):
    """A pruning method. Updates the problem's weights in place and returns the masks."""

    name: str = ""
    #: whether the method can enforce an N:M pattern
    supports_pattern: bool = True

    @abstractmethod
    def prune(self, problem: FisherProblem, spec: SparsitySpec, progress: ProgressFn | None = None) -> PruneResult:
        ...
