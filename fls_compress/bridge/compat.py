"""Converters for operator versions newer than onnx2torch 1.5.15 knows.

onnx2torch looks a converter up by the exact ``since_version`` of the op schema in force at the
model's opset, and its registry stops around opset 17. Current exporters (torch's dynamo exporter
writes opset 18-20) therefore fail on ops whose schema was bumped only to admit new element types
(e.g. ``Shape-19``) or whose attributes moved to inputs (``ReduceMean-18``).

:func:`install_compat` registers, through onnx2torch's own ``add_converter`` registry:

* aliases to onnx2torch's existing converter where the new version is a type-only bump;
* guarded aliases where the new version adds a feature (the guard raises ``NotImplementedError``
  when the feature is used, so nothing is converted silently wrong);
* LSTM and GRU (:mod:`.rnn`), and an exact Pad for every rank and mode (:mod:`.pad`);
* the converter package :mod:`fls_compress.bridge.ops` (operators onnx2torch lacks, newer versions);
* small exact modules where the semantics changed: Reduce*-18/20 (constant ``axes`` input),
  Gelu-20, Reshape-19/21 with ``allowzero=1``, Split-18 with ``num_outputs``, and Size (absent
  from onnx2torch).

Calling it more than once is harmless.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import TConverter, add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import (
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
    onnx_mapping_from_node,
)
from torch import nn

from fls_compress.bridge.pad import install_pad
from fls_compress.bridge.rnn import install_recurrent

_LOG = logging.getLogger(__name__)

#: (op, existing onnx2torch version, new versions with identical semantics)
_TYPE_ONLY_ALIASES: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("GreaterOrEqual", 12, (16,)),
    ("LessOrEqual", 12, (16,)),
    ("Shape", 15, (19, 21)),
    ("Cast", 13, (19, 21)),
    ("Identity", 16, (19, 21)),
    ("Constant", 13, (19, 21)),
    ("Equal", 13, (19,)),
    ("IsNaN", 13, (20,)),
    ("ConstantOfShape", 9, (20, 21)),
    ("Transpose", 13, (21,)),
    ("Unsqueeze", 13, (21,)),
    ("Flatten", 13, (21,)),
)

_REDUCE_18 = (
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSumSquare",
)

_installed = False


# ------------------------------------------------------------------------------------------------
# Exact modules for changed semantics
# ------------------------------------------------------------------------------------------------
def _reduce_prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):  # descending, so earlier dims keep their index
        x = torch.prod(x, dim=dim, keepdim=keepdim)
    return x


_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
}


class OnnxReduceConstAxes(nn.Module, OnnxToTorchModule):
    """ONNX Reduce*-18 with ``axes`` known at conversion time (``None``: all axes, or no-op)."""

    def __init__(self, operation_type: str, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.operation_type = operation_type
        self.axes = axes
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            if self.noop_with_empty_axes:
                return input_tensor
            dims = list(range(input_tensor.dim()))
        else:
            dims = sorted({axis % input_tensor.dim() for axis in self.axes})
        if not dims:  # rank-0 input: nothing to reduce (torch would read [] as "all dims")
            return input_tensor
        return _REDUCERS[self.operation_type](input_tensor, dims, self.keepdims)


class OnnxGelu(nn.Module, OnnxToTorchModule):
    """ONNX Gelu-20; ``approximate`` is ``"none"`` or ``"tanh"`` exactly as in torch."""

    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return F.gelu(input_tensor, approximate=self.approximate)


class OnnxReshapeAllowZero(nn.Module, OnnxToTorchModule):
    """ONNX Reshape with ``allowzero=1``: a 0 in ``shape`` is a literal empty dimension, as in torch."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(input_tensor, tuple(int(d) for d in shape.tolist()))


class OnnxSize(nn.Module, OnnxToTorchModule):
    """ONNX Size: the number of elements of the input, as an int64 scalar."""

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        return torch.tensor(input_tensor.numel(), dtype=torch.int64, device=input_tensor.device)


class OnnxSplitNumOutputs(nn.Module, OnnxToTorchModule):
    """ONNX Split-18 with ``num_outputs``: chunks of ``ceil(len / n)``, the last one smaller."""

    def __init__(self, axis: int, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs

    def forward(self, input_tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        length = input_tensor.shape[self.axis]
        chunk = math.ceil(length / self.num_outputs)
        last = length - chunk * (self.num_outputs - 1)
        if last < 0:
            raise RuntimeError(f"Split: axis of length {length} cannot give {self.num_outputs} outputs")
        return torch.split(input_tensor, [chunk] * (self.num_outputs - 1) + [last], dim=self.axis)


# ------------------------------------------------------------------------------------------------
# Converters
# ------------------------------------------------------------------------------------------------
def _reduce_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axes: list[int] | None = None
    inputs = node.input_values
    if len(inputs) > 1 and inputs[1] != "":
        try:
            axes = [int(a) for a in torch.as_tensor(get_const_value(inputs[1], graph)).reshape(-1).tolist()]
        except KeyError as exc:
            raise NotImplementedError(f"{node.operation_type} with non-constant axes is not implemented") from exc
    module = OnnxReduceConstAxes(
        operation_type=node.operation_type,
        axes=axes,
        keepdims=node.attributes.get("keepdims", 1) == 1,
        noop_with_empty_axes=node.attributes.get("noop_with_empty_axes", 0) == 1,
    )
    return OperationConverterResult(module, OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))


def _gelu_20(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    approximate = node.attributes.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NotImplementedError(f'Gelu approximate="{approximate}" is not implemented')
    return OperationConverterResult(OnnxGelu(approximate), onnx_mapping_from_node(node))


def _reshape_19(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if node.attributes.get("allowzero", 0) == 1:
        return OperationConverterResult(OnnxReshapeAllowZero(), onnx_mapping_from_node(node))
    return get_converter("Reshape", 14)(node, graph)


def _size(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    del graph
    return OperationConverterResult(OnnxSize(), onnx_mapping_from_node(node))


def _split_18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    inputs = node.input_values
    if len(inputs) > 1 and inputs[1] != "":
        return get_converter("Split", 13)(node, graph)
    num_outputs = node.attributes.get("num_outputs")
    if num_outputs is None or num_outputs != len(node.output_values):
        raise NotImplementedError("Split-18 without a split input needs num_outputs equal to the output count")
    module = OnnxSplitNumOutputs(axis=node.attributes.get("axis", 0), num_outputs=num_outputs)
    return OperationConverterResult(module, OnnxMapping(inputs=(inputs[0],), outputs=node.output_values))


def _guarded(base_op: str, base_version: int, check: Callable[[OnnxNode], str | None]) -> TConverter:
    """onnx2torch's converter for ``base_op``-``base_version``, refusing nodes that ``check`` flags."""

    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        problem = check(node)
        if problem is not None:
            raise NotImplementedError(f"{node.operation_type}: {problem} is not implemented")
        return get_converter(base_op, base_version)(node, graph)

    return converter


def _pool_dilated(node: OnnxNode) -> str | None:
    dilations = node.attributes.get("dilations")
    return "dilations != 1" if dilations is not None and any(d != 1 for d in dilations) else None


def _isinf_one_sided(node: OnnxNode) -> str | None:
    attrs = node.attributes
    if attrs.get("detect_negative", 1) != 1 or attrs.get("detect_positive", 1) != 1:
        return "detect_negative/detect_positive = 0"
    return None


# ------------------------------------------------------------------------------------------------
def _is_registered(op: str, version: int) -> bool:
    try:
        get_converter(operation_type=op, version=version)
    except NotImplementedError:
        return False
    return True


def _register(op: str, version: int, converter: TConverter) -> None:
    if not _is_registered(op, version):
        add_converter(operation_type=op, version=version)(converter)


def install_compat() -> None:
    """Register the extra converters in onnx2torch's registry (idempotent)."""
    global _installed  # noqa: PLW0603 - one process-wide registry
    if _installed:
        return
    for op, base_version, versions in _TYPE_ONLY_ALIASES:
        base = get_converter(op, base_version)
        for version in versions:
            _register(op, version, base)
    for op in _REDUCE_18:
        _register(op, 18, _reduce_18)
    for op in ("ReduceMax", "ReduceMin"):
        _register(op, 20, _reduce_18)
    _register("Gelu", 20, _gelu_20)
    for version in (19, 21):
        _register("Reshape", version, _reshape_19)
    _register("Split", 18, _split_18)
    for version in (1, 13, 19, 21):
        _register("Size", version, _size)
    _register("AveragePool", 19, _guarded("AveragePool", 11, _pool_dilated))
    _register("IsInf", 20, _guarded("IsInf", 10, _isinf_one_sided))
    install_recurrent()
    install_pad()
    from fls_compress.bridge.ops import install_ops  # after Pad/LSTM/GRU: some aliases point at those

    install_ops()
    _installed = True
    _LOG.debug("onnx2torch compatibility converters installed")
