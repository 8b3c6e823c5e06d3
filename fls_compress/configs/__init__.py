"""Typed configs: one per method (the config type selects the handler), and the run options.

>>> from fls_compress.configs import FLSConfig, config_from_dict
>>> cfg = FLSConfig(sparsity=0.9, fit_steps=100)
>>> config_from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidOptionError
from .base import Config, knob, option_flag
from .pruning import (
    ACTIVATIONS,
    TORCH,
    AutoConfig,
    FLSConfig,
    IEFConfig,
    MagnitudeConfig,
    MethodConfig,
    MFACConfig,
    OBertConfig,
    PruneConfig,
    SparseGPTConfig,
    WandaConfig,
)
from .quantize import QUANTIZE_CONFIGS, FLSQuantConfig, GPTQConfig, QuantizeConfig, RTNConfig
from .run import RunOptions

PRUNE_CONFIGS: tuple[type[MethodConfig], ...] = (
    FLSConfig, OBertConfig, IEFConfig, MFACConfig, SparseGPTConfig, WandaConfig, MagnitudeConfig, AutoConfig,
)


def config_types(command: str | None = None) -> dict[str, type[MethodConfig]]:
    """Method name -> config class, for one command (``prune``/``quantize``) or all."""
    types = {"prune": PRUNE_CONFIGS, "quantize": QUANTIZE_CONFIGS}
    chosen = [t for cmd, group in types.items() if command in (None, cmd) for t in group]
    if command is None:  # method names repeat across commands (fls): key by command too
        return {f"{t.command}:{t.method}": t for t in chosen}
    return {t.method: t for t in chosen}


#: the method a command uses when none is named. quantize: GPTQ, which matched or beat FLS's curvature on
#: validation splits at 8 and 4 bits at a fraction of the time (benchmarks/results/quantize_default.md)
DEFAULT_METHODS = {"prune": "fls", "quantize": "gptq"}


def config_from_dict(data: dict[str, Any], command: str = "prune") -> MethodConfig:
    """Build the config a job spec describes; ``method`` selects the type, unknown keys are refused."""
    if not isinstance(data, dict):
        raise InvalidOptionError(f"config must be a mapping, got {type(data).__name__}")
    types = config_types(command)
    method = data.get("method", DEFAULT_METHODS.get(command, "fls"))
    if method not in types:
        raise InvalidOptionError(f"unknown {command} method {method!r}; choose one of {', '.join(sorted(types))}")
    return types[method].from_dict(data)


__all__ = [
    "ACTIVATIONS", "TORCH", "AutoConfig", "Config", "FLSQuantConfig", "GPTQConfig", "QuantizeConfig", "RTNConfig", "FLSConfig", "IEFConfig", "MagnitudeConfig", "MethodConfig", "MFACConfig",
    "OBertConfig", "PruneConfig", "RunOptions", "SparseGPTConfig", "WandaConfig", "config_from_dict", "config_types", "DEFAULT_METHODS",
    "knob", "option_flag",
]
