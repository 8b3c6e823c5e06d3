"""Quantization configs: one per method, sharing the grid and the optional joint pruning target.

* :class:`RTNConfig` - round to nearest (the reference);
* :class:`GPTQConfig` - OBS column sweep with the layer Hessian 2 X^T X of captured activations
  (Frantar et al. 2023, GPTQ); needs onnxruntime activations only;
* :class:`FLSQuantConfig` - the same sweep with the curvature FishLeg fits (the Kronecker factor of the
  loss Fisher, so rounding errors are compensated where the model's loss cares); needs the torch graph.

``sparsity``/``pattern`` prune in the same sweep (pruned weights are exactly zero after dequantization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from .base import knob
from .pruning import ACTIVATIONS, DEFAULT_MAX_ROWS, TORCH, ActivationCapture, FishLegFit, LossFisher, MethodConfig, PruneConfig

#: GPTQ's rows per layer when ``max_rows_per_layer`` is unset, for 8-bit weights without joint pruning: the
#: 8-bit rounding error is small enough that half the default rows compensate it as well (benchmarks/gptq_rows.py)
GPTQ_ROWS_8BIT = 32768


def parse_granularity(value: str) -> str:
    """``per-tensor`` | ``per-channel`` | ``block:G`` -> the grid's spelling (``tensor``/``channel``/``block:G``)."""
    if value in ("per-tensor", "per-channel"):
        return value[4:]
    if value.startswith("block:"):
        size = value.split(":", 1)[1]
        if size.isdigit() and int(size) >= 1:
            return value
    raise InvalidOptionError(f"--granularity must be per-channel, per-tensor or block:G (G >= 1), got {value!r}")


DEFAULT_PERCENTILE = 99.99


def parse_calibration(value: str) -> tuple[str, float | None]:
    """``minmax`` | ``percentile`` | ``percentile:P`` (50 < P <= 100) | ``entropy`` | ``mse`` -> (method, P)."""
    if value in ("minmax", "entropy", "mse"):
        return value, None
    if value == "percentile":
        return value, DEFAULT_PERCENTILE
    if value.startswith("percentile:"):
        try:
            p = float(value.split(":", 1)[1])
        except ValueError:
            p = float("nan")
        if 50.0 < p <= 100.0:
            return "percentile", p
    raise InvalidOptionError(f"--act-calibration must be minmax, entropy, mse, percentile or percentile:P with "
                             f"50 < P <= 100, got {value!r}")


@dataclass(frozen=True)
class QuantizeConfig(PruneConfig):
    """Weight quantization (and optional joint pruning), emitted as QDQ ONNX."""

    command: ClassVar[str] = "quantize"
    panel: ClassVar[str] = "Quantization"

    bits: int = knob(8, "Weight bits: 8 or 4.", min=4, max=8)
    granularity: str = knob("per-channel", "Scale granularity: per-channel, per-tensor or block:G (G input columns per scale).")
    symmetric: bool = knob(True, "Symmetric grid (int8/int4, zero point 0) or asymmetric (uint8/uint4 with zero point).")
    activations: str = knob("none", "Also quantize the layers' input activations: int8 (static uint8 QDQ, calibrated "
                            "ranges) or int8-dynamic (MatMul/Gemm inputs quantized per call, onnxruntime's "
                            "DynamicQuantizeMatMul; Conv inputs static).", choices=("none", "int8", "int8-dynamic"))
    act_calibration: str = knob("minmax", "Static activation ranges (--activations int8; int8-dynamic: its Conv layers): minmax, percentile[:P] "
                                "(default P 99.99), entropy (KL-divergence threshold) or mse (least expected squared error).")
    matmul_format: str = knob("auto", "4-bit MatMul weights: auto writes onnxruntime's com.microsoft.MatMulNBits (its "
                              "4-bit kernel), qdq a DequantizeLinear (portable ONNX, opset 21).", choices=("auto", "qdq"))

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise InvalidOptionError(f"--bits must be 4 or 8, got {self.bits}")
        parse_granularity(self.granularity)
        parse_calibration(self.act_calibration)
        if self.act_calibration != "minmax" and self.activations == "none":
            raise InvalidOptionError("--act-calibration chooses activation ranges: it needs --activations int8 "
                                     "(or int8-dynamic, for its Conv layers)")
        if self.matmul_format != "auto" and self.bits != 4:
            raise InvalidOptionError("--matmul-format applies to 4-bit weights (--bits 4)")

    @property
    def target(self) -> float:
        """Joint pruning target (0: quantize only)."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 0.0 if self.sparsity is None else float(self.sparsity)

    @property
    def grid_granularity(self) -> str:
        return parse_granularity(self.granularity)


@dataclass(frozen=True)
class RTNConfig(QuantizeConfig):
    method: ClassVar[str] = "rtn"
    summary: ClassVar[str] = "round to nearest on the grid (the reference); joint pruning by magnitude"


@dataclass(frozen=True)
class GPTQConfig(QuantizeConfig, ActivationCapture):
    method: ClassVar[str] = "gptq"
    panel: ClassVar[str] = "GPTQ"
    needs: ClassVar[frozenset[str]] = frozenset({ACTIVATIONS})
    summary: ClassVar[str] = "OBS column sweep with the layer Hessian 2 X^T X (Frantar et al. 2023)"

    percdamp: float = knob(0.01, "Damping of the layer Hessian, as a fraction of its mean diagonal.", min=0.0, max=10.0)
    lazy_block: int = knob(128, "Columns per lazy block; the adaptive mask is chosen per block.", min=1, max=65536)
    act_order: bool = knob(False, "Quantize columns in order of decreasing Hessian diagonal (GPTQ act-order).")
    max_rows_per_layer: int | None = knob(
        None, f"Activation rows per layer at most (seeded random subsample of positions on big feature maps). Unset: "
        f"{GPTQ_ROWS_8BIT} for 8-bit weights without --sparsity/--pattern, {DEFAULT_MAX_ROWS} otherwise (4-bit "
        "grids and pruning need the finer curvature); the value used is in the report.", min=1, max=1 << 40)
    hessian_shrinkage: str = knob("oas", "Layer Hessian estimate: oas shrinks its covariance part towards isotropy "
                                  "as far as the calibration rows are few for the layer width (Chen et al. 2010); "
                                  "none uses 2 X^T X / n as is.", choices=("oas", "none"))

    @property
    def rows_per_layer(self) -> int:
        """``max_rows_per_layer``, or its default for these bits and pruning target when unset."""
        if self.max_rows_per_layer is not None:
            return self.max_rows_per_layer
        return GPTQ_ROWS_8BIT if self.bits == 8 and self.target == 0 else DEFAULT_MAX_ROWS


@dataclass(frozen=True)
class FLSQuantConfig(QuantizeConfig, LossFisher, FishLegFit):
    """The OBS sweep with FishLeg's Kronecker factor: U = chol(L L^T), rows scaled by D_A."""

    method: ClassVar[str] = "fls"
    panel: ClassVar[str] = "FishLeg Surgeon (fls)"
    needs: ClassVar[frozenset[str]] = frozenset({TORCH})
    summary: ClassVar[str] = "OBS sweep with the FishLeg inverse Fisher of the model's loss (Kronecker factor)"

    q_init: str = knob("kfac", "Q start: kfac or identity (the sweep needs the Kronecker form).", choices=("kfac", "identity"))
    lazy_block: int = knob(128, "Columns per lazy block; the adaptive mask is chosen per block.", min=1, max=65536)


QUANTIZE_CONFIGS: tuple[type[MethodConfig], ...] = (FLSQuantConfig, GPTQConfig, RTNConfig)
