"""Normalisation operators onnx2torch lacks (ONNX operator specs).

* GroupNormalization (Wu & He 2018, eq. 1: ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` with
  mean and biased variance per sample and group of ``C / num_groups`` channels). Opset 18 gives
  ``scale``/``bias`` per *group* (shape ``[num_groups]``), opset 21 per *channel* (``[C]``, and
  ``stash_type``: 1 computes the first stage in float32, which is what the bridge computes in).
* RMSNormalization-23 (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + epsilon) * scale`` over axes
  ``axis..rank-1``, ``scale`` broadcast unidirectionally.
* LpNormalization-1/22: ``x / ||x||_p`` along ``axis`` (``p`` 1 or 2).
* MeanVarianceNormalization-9/13 (its function body): ``(x - E[x]) / (sqrt(E[x^2] - E[x]^2) + 1e-9)``
  over ``axes`` (default ``[0, 2, 3]``).

Scales and biases are forward inputs, so a weight stored as an initializer receives gradients like
any other (the bridge makes prunable ones trainable parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, result


class OnnxGroupNorm(OnnxModule):
    def __init__(self, num_groups: int, epsilon: float, per_channel: bool):
        super().__init__()
        self.num_groups, self.epsilon, self.per_channel = num_groups, epsilon, per_channel

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return F.group_norm(x, self.num_groups, scale, bias, self.epsilon)
        n = x.shape[0]
        grouped = x.reshape(n, self.num_groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        var = ((grouped - mean) ** 2).mean(dim=-1, keepdim=True)
        normed = (grouped - mean) / torch.sqrt(var + self.epsilon)
        y = normed * scale.reshape(1, -1, 1) + bias.reshape(1, -1, 1)
        return y.reshape(x.shape)


class OnnxRMSNorm(OnnxModule):
    def __init__(self, axis: int, epsilon: float):
        super().__init__()
        self.axis, self.epsilon = axis, epsilon

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(self.axis % x.dim(), x.dim()))
        rms = torch.sqrt(torch.mean(x * x, dim=dims, keepdim=True) + self.epsilon)
        return x / rms * scale


class OnnxLpNorm(OnnxModule):
    def __init__(self, axis: int, p: int):
        super().__init__()
        self.axis, self.p = axis, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.sum(torch.abs(x), dim=self.axis, keepdim=True) if self.p == 1 else \
            torch.sqrt(torch.sum(x * x, dim=self.axis, keepdim=True))
        return x / norm


class OnnxMeanVarianceNorm(OnnxModule):
    def __init__(self, axes: list[int]):
        super().__init__()
        self.axes = list(axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(sorted({a % x.dim() for a in self.axes}))
        mean = torch.mean(x, dim=dims, keepdim=True)
        var = torch.mean(x * x, dim=dims, keepdim=True) - mean * mean
        return (x - mean) / (torch.sqrt(var) + 1e-9)


def _group_norm(per_channel: bool):
    def convert(node: OnnxNode, graph: OnnxGraph):
        if int(attr(node, "stash_type", 1)) != 1:
            raise NotImplementedError("GroupNormalization with stash_type != 1 is not implemented")
        module = OnnxGroupNorm(int(attr(node, "num_groups", 0)), float(attr(node, "epsilon", 1e-5)), per_channel)
        return result(node, module)

    return convert


converter("GroupNormalization", 18)(_group_norm(per_channel=False))
converter("GroupNormalization", 21)(_group_norm(per_channel=True))


@converter("RMSNormalization", 23)
def _rms_norm(node: OnnxNode, graph: OnnxGraph):
    if int(attr(node, "stash_type", 1)) != 1:
        raise NotImplementedError("RMSNormalization with stash_type != 1 is not implemented")
    return result(node, OnnxRMSNorm(int(attr(node, "axis", -1)), float(attr(node, "epsilon", 1e-5))))


@converter("LpNormalization", 1, 22)
def _lp_norm(node: OnnxNode, graph: OnnxGraph):
    p = int(attr(node, "p", 2))
    if p not in (1, 2):
        raise NotImplementedError(f"LpNormalization with p={p} is not defined (p is 1 or 2)")
    return result(node, OnnxLpNorm(int(attr(node, "axis", -1)), p))


@converter("MeanVarianceNormalization", 9, 13)
def _mvn(node: OnnxNode, graph: OnnxGraph):
    return result(node, OnnxMeanVarianceNorm(attr(node, "axes", [0, 2, 3]) or [0, 2, 3]))
