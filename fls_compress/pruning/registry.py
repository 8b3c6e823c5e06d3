"""Name -> pruning method, for the ``--method`` option. Each factory takes a :class:`MethodOptions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..curvature.fishleg import FishLegConfig, FishLegEstimator
from ..errors import InvalidOptionError
from .base import Pruner
from .magnitude import MagnitudePruner
from .obs import OBSPruner


@dataclass
class MethodOptions:
    """Knobs shared by the methods; each method reads the ones it needs."""

    fishleg: FishLegConfig
    damping: float | None = None  # absolute damping for the empirical-Fisher baselines (None = relative)
    relative_damping: float = 0.1
    num_grads: int = 256  # m: gradients for oBERT / M-FAC / iEF
    block_size: int = 50
    num_samples: int = 512  # calibration samples for layer-wise methods (SparseGPT, Wanda)


def _fls(opts: MethodOptions) -> Pruner:
    return OBSPruner(FishLegEstimator(opts.fishleg))


def _magnitude(opts: MethodOptions) -> Pruner:
    return MagnitudePruner()


METHODS: dict[str, Callable[[MethodOptions], Pruner]] = {
    "fls": _fls,
    "magnitude": _magnitude,
}

# --- baseline methods register themselves below (see fls_compress/pruning/baselines.py) ---


def available_methods() -> list[str]:
    from . import baselines  # noqa: F401  (registers oBERT, M-FAC, SparseGPT, Wanda, iEF if present)

    return sorted(METHODS)


def make_pruner(method: str, opts: MethodOptions) -> Pruner:
    """Instantiate the pruner called ``method``."""
    names = available_methods()
    if method not in METHODS:
        raise InvalidOptionError(f"unknown method {method!r}; choose one of {', '.join(names)}")
    return METHODS[method](opts)
