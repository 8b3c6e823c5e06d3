"""Shared pieces of the converter package: the registry of what it converts, node helpers.

Every converter module calls :func:`converter` to declare ``(op, versions)`` it handles; the
declarations are collected in :data:`OURS` (for the coverage table, ``fls-compress inspect`` and the
tests) and put into onnx2torch's registry by :func:`fls_compress.bridge.ops.install_ops`. A converter
raises ``NotImplementedError`` for an attribute combination it does not implement, which the bridge
reports as an unsupported model: nothing is ever converted approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from onnx2torch.node_converters.registry import TConverter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, get_const_value
from torch import nn


@dataclass(frozen=True)
class Declared:
    """One converter of this package: the op, the ONNX versions it handles, its family module, and
    whether it replaces (``override``) an onnx2torch converter for those versions."""

    op: str
    versions: tuple[int, ...]
    family: str
    fn: TConverter
    override: bool = False


#: every converter of the package, in declaration order
OURS: list[Declared] = []


def converter(op: str, *versions: int, override: bool = False) -> Callable[[TConverter], TConverter]:
    """Declare ``fn`` as the converter of ``op`` for ``versions`` (registered by ``install_ops``)."""

    def deco(fn: TConverter) -> TConverter:
        family = fn.__module__.rsplit(".", 1)[-1]
        OURS.append(Declared(op, tuple(versions), family, fn, override))
        return fn

    return deco


class OnnxModule(nn.Module, OnnxToTorchModule):
    """Base of the package's modules (onnx2torch recognises ``OnnxToTorchModule`` subclasses)."""


def attr(node: OnnxNode, name: str, default):
    """An attribute value with strings decoded; an empty repeated attribute reads as ``[]``."""
    value = node.attributes.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    if value is not None and not isinstance(value, (int, float, str, list, tuple)):
        return []  # onnx2torch leaves an empty INTS/FLOATS attribute as the raw proto
    return value


def inputs_of(node: OnnxNode, count: int) -> list[str]:
    """The node's input names padded with ``""`` (omitted optional inputs) to ``count``."""
    values = list(node.input_values)
    return values + [""] * (count - len(values))


def present(node: OnnxNode, count: int) -> tuple[list[str], tuple[bool, ...]]:
    """(non-empty input names, which of the ``count`` positions are present) for a mapping."""
    names = inputs_of(node, count)
    return [n for n in names if n], tuple(n != "" for n in names)


def mapping(node: OnnxNode, inputs: list[str]) -> OnnxMapping:
    return OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)


def result(node: OnnxNode, module: nn.Module, inputs: list[str] | None = None) -> OperationConverterResult:
    """The converter result for ``module`` fed with ``inputs`` (default: every non-empty input)."""
    if inputs is None:
        inputs = [n for n in node.input_values if n]
    return OperationConverterResult(module, mapping(node, inputs))


def const_ints(name: str, graph: OnnxGraph, what: str) -> list[int]:
    """A constant integer input read at conversion time (``NotImplementedError`` when it is computed)."""
    try:
        value = get_const_value(name, graph)
    except KeyError as exc:
        raise NotImplementedError(f"{what} given by a computed tensor is not implemented") from exc
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


def spread(inputs: tuple[torch.Tensor, ...], flags: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """Put the tensors received for present inputs back at their ONNX positions (``None`` elsewhere)."""
    it = iter(inputs)
    return [next(it) if flag else None for flag in flags]
