"""Config type -> pruning handler (as ``quantize_(model, config)`` in torchao: the config selects the code).

Each handler builds the :class:`~fls_compress.pruning.base.Pruner` for one config class from that
config's knobs alone (and the run options for the calibration sample count), so an option can only
reach the method that declares it.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..configs import (
    FLSConfig,
    IEFConfig,
    MagnitudeConfig,
    MethodConfig,
    MFACConfig,
    OBertConfig,
    RunOptions,
    SparseGPTConfig,
    WandaConfig,
)
from ..configs.pruning import CurvatureConfig, DEFAULT_Q_BLOCK, GlobalScope, PruneConfig
from ..curvature.empirical_fisher import BlockFisherEstimator
from ..curvature.fishleg import FishLegConfig, FishLegEstimator
from ..curvature.mfac import MFACEstimator
from ..errors import InvalidOptionError
from .base import Pruner, SparsitySpec
from .magnitude import MagnitudePruner
from .obs import OBSPruner
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

C = TypeVar("C", bound=MethodConfig)
Handler = Callable[[MethodConfig, RunOptions], Pruner]
HANDLERS: dict[type[MethodConfig], Handler] = {}


def handles(config_type: type[C]) -> Callable[[Callable[[C, RunOptions], Pruner]], Callable[[C, RunOptions], Pruner]]:
    def register(fn: Callable[[C, RunOptions], Pruner]) -> Callable[[C, RunOptions], Pruner]:
        HANDLERS[config_type] = fn  # type: ignore[assignment]
        return fn

    return register


def make_pruner(config: MethodConfig, run: RunOptions | None = None) -> Pruner:
    """The pruner for ``config`` (its exact type selects the handler)."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise InvalidOptionError(f"no pruning handler for {type(config).__name__}")
    return handler(config, run or RunOptions())


def spec_for(config: PruneConfig) -> SparsitySpec:
    """The sparsity target of a config (scope and sub-steps only where the method has them)."""
    scope = config.scope if isinstance(config, GlobalScope) else "layer"
    steps = config.num_steps if isinstance(config, CurvatureConfig) else 1
    return SparsitySpec(config.target, scope=scope, pattern=config.pattern, steps=steps)


def fishleg_config(config: FLSConfig) -> FishLegConfig:
    """The estimator settings an :class:`FLSConfig` stands for (every value explicit)."""
    return FishLegConfig(
        form=config.q_form,
        block_size=config.block_size or DEFAULT_Q_BLOCK,
        damping=config.damping,
        relative_damping=config.gamma_relative,
        init=config.resolved_init,
        fit_steps=config.fit_steps,
        refit_steps=config.refit_steps,
        refit_mode=config.refit,
        aux_batch=config.batch_size,
        lr=config.aux_lr,
        precondition=config.precondition,
        fast_matmul=config.fit_matmul == "fast",
        update=config.resolved_update,
        diag_samples=config.moment_samples,
        probes=config.probes,
        fit_seconds=config.fit_seconds,
    )


@handles(FLSConfig)
def _fls(config: FLSConfig, run: RunOptions) -> Pruner:
    return OBSPruner(FishLegEstimator(fishleg_config(config)))


@handles(OBertConfig)
def _obert(config: OBertConfig, run: RunOptions) -> Pruner:
    return OBSPruner(BlockFisherEstimator(config.num_grads, config.block_size, config.damping, config.gamma_relative))


@handles(IEFConfig)
def _ief(config: IEFConfig, run: RunOptions) -> Pruner:
    return OBSPruner(
        BlockFisherEstimator(config.num_grads, config.block_size, config.damping, config.gamma_relative, ief=True)
    )


@handles(MFACConfig)
def _mfac(config: MFACConfig, run: RunOptions) -> Pruner:
    return OBSPruner(MFACEstimator(config.num_grads, config.damping, config.gamma_relative))


@handles(SparseGPTConfig)
def _sparsegpt(config: SparseGPTConfig, run: RunOptions) -> Pruner:
    return SparseGPTPruner(num_samples=run.num_calibration, block_size=config.lazy_block, percdamp=config.percdamp,
                           sequential=config.sequential, max_rows_per_layer=config.max_rows_per_layer, seed=run.seed)


@handles(WandaConfig)
def _wanda(config: WandaConfig, run: RunOptions) -> Pruner:
    return WandaPruner(num_samples=run.num_calibration, sequential=config.sequential,
                       max_rows_per_layer=config.max_rows_per_layer, seed=run.seed)


@handles(MagnitudeConfig)
def _magnitude(config: MagnitudeConfig, run: RunOptions) -> Pruner:
    return MagnitudePruner()
