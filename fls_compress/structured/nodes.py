"""Reading ONNX nodes: a node's label (its name, or op type and index) and its attributes as Python values."""

from __future__ import annotations

import onnx
from onnx import helper


def label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
