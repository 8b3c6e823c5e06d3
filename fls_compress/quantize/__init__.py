"""OBS-compensated weight quantisation (RTN, GPTQ, FishLeg curvature) and QDQ ONNX export."""

from .grid import Grid, QuantSpec
from .model import quantize_model, quantize_weights

__all__ = ["Grid", "QuantSpec", "quantize_model", "quantize_weights"]
