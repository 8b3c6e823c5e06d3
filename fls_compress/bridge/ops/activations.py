"""Element-wise activations onnx2torch lacks (ONNX operator specs, versions as registered).

* Mish-18/22: ``x * tanh(softplus(x))`` (Misra 2019).
* Swish-24: ``x * sigmoid(alpha * x)`` (Ramachandran et al. 2017), ``alpha`` default 1.
* ThresholdedRelu-10/22: ``x if x > alpha else 0``, ``alpha`` default 1.
* Shrink-9: ``x + bias if x < -lambd``, ``x - bias if x > lambd``, else 0.
* Hardmax-1/11/13: one-hot of the first maximum; before opset 13 over the input coerced to 2-D at
  ``axis`` (default 1), from 13 along ``axis`` (default -1).
* Acosh/Asinh/Atanh/Cosh/Sinh-9/22: the hyperbolic functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, result


class OnnxMish(OnnxModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x)


class OnnxSwish(OnnxModule):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.alpha * x)


class OnnxThresholdedRelu(OnnxModule):
    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > self.alpha, x, torch.zeros_like(x))


class OnnxShrink(OnnxModule):
    def __init__(self, lambd: float, bias: float):
        super().__init__()
        self.lambd = lambd
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x)
        return torch.where(x < -self.lambd, x + self.bias, torch.where(x > self.lambd, x - self.bias, zero))


class OnnxHardmax(OnnxModule):
    def __init__(self, axis: int, coerce_2d: bool):
        super().__init__()
        self.axis = axis
        self.coerce_2d = coerce_2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if x.dim() else 0
        if self.coerce_2d:
            flat = x.reshape(math.prod(x.shape[:axis]), -1)
            return F.one_hot(flat.argmax(dim=1), flat.shape[1]).to(x.dtype).reshape(x.shape)
        index = x.argmax(dim=axis, keepdim=True)  # first maximum, as the spec requires
        return torch.zeros_like(x).scatter_(axis, index, 1.0)


class OnnxUnary(OnnxModule):
    """One torch element-wise function (hyperbolic family)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(torch, self.name)(x)


@converter("Mish", 18, 22)
def _mish(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxMish())


@converter("Swish", 24)
def _swish(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxSwish(float(attr(node, "alpha", 1.0))))


@converter("ThresholdedRelu", 10, 22)
def _thresholded_relu(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxThresholdedRelu(float(attr(node, "alpha", 1.0))))


@converter("Shrink", 9)
def _shrink(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxShrink(float(attr(node, "lambd", 0.5)), float(attr(node, "bias", 0.0))))


@converter("Hardmax", 1, 11)
def _hardmax_2d(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxHardmax(int(attr(node, "axis", 1)), coerce_2d=True))


@converter("Hardmax", 13)
def _hardmax(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxHardmax(int(attr(node, "axis", -1)), coerce_2d=False))


def _unary(name: str):
    def convert(node: OnnxNode, graph: OnnxGraph):
        return result(node, OnnxUnary(name))

    return convert


for _op, _fn in (("Acosh", "acosh"), ("Asinh", "asinh"), ("Atanh", "atanh"), ("Cosh", "cosh"), ("Sinh", "sinh")):
    converter(_op, 9, 22)(_unary(_fn))
