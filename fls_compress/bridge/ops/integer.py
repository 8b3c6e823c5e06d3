"""Integer bit operators (ONNX operator specs): BitwiseAnd/Or/Xor/Not-18 and BitShift-11.

They carry no gradient but appear in exported index arithmetic; converting them keeps such graphs
convertible. ``BitShift`` shifts unsigned integers by ``direction`` LEFT or RIGHT (bits shifted out
are lost, as in C on the element type).
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import OnnxModule, attr, converter, result


class OnnxBitwise(OnnxModule):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        fn = getattr(torch, self.name)
        return fn(a) if b is None else fn(a, b)


class OnnxBitShift(OnnxModule):
    def __init__(self, left: bool):
        super().__init__()
        self.left = left

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.bitwise_left_shift(x, shift) if self.left else torch.bitwise_right_shift(x, shift)


def _bitwise(name: str):
    def convert(node: OnnxNode, graph: OnnxGraph):
        return result(node, OnnxBitwise(name))

    return convert


for _op, _fn in (("BitwiseAnd", "bitwise_and"), ("BitwiseOr", "bitwise_or"), ("BitwiseXor", "bitwise_xor"),
                 ("BitwiseNot", "bitwise_not")):
    converter(_op, 18)(_bitwise(_fn))


@converter("BitShift", 11)
def _bit_shift(node: OnnxNode, graph: OnnxGraph):
    direction = attr(node, "direction", "")
    if direction not in ("LEFT", "RIGHT"):
        raise NotImplementedError(f"BitShift direction={direction!r} is not defined")
    return result(node, OnnxBitShift(direction == "LEFT"))
