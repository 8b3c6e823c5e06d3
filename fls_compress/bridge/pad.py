"""An exact ONNX ``Pad`` for every rank and mode (onnx2torch's refuses reflect/edge padding of
tensors that are not 4-D/5-D-shaped like images, e.g. the ``[batch, time]`` audio of Silero VAD).

ONNX ``pads`` is ``[x1_begin, ..., xn_begin, x1_end, ..., xn_end]`` over the (optionally ``axes``-
selected) dimensions. ``constant`` maps to ``torch.nn.functional.pad`` directly (any rank, negative
pads crop). ``reflect`` / ``edge`` / ``wrap`` (torch ``reflect`` / ``replicate`` / ``circular``) only
exist in torch for the last 1-3 dimensions of a 2-5-D tensor, so the padded trailing dimensions are
kept and all leading ones are flattened into one batch axis (plus a unit channel axis), padded, and
reshaped back - the same values, since those modes never mix leading positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx2torch.node_converters import registry
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, get_const_value
from torch import nn

_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def pad_onnx(x: torch.Tensor, pads: list[int], mode: str, value: float = 0.0, axes: list[int] | None = None) -> torch.Tensor:
    """ONNX Pad semantics on a torch tensor (see the module docstring)."""
    rank = x.dim()
    half = len(pads) // 2
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes[:half]):
        begin[axis], end[axis] = int(pads[i]), int(pads[half + i])
    padded = [a for a in range(rank) if begin[a] or end[a]]
    if not padded:
        return x
    first = min(padded)
    torch_pads: list[int] = []
    for axis in reversed(range(first, rank)):
        torch_pads.extend([begin[axis], end[axis]])
    if mode == "constant":
        return F.pad(x, torch_pads, mode="constant", value=value)
    trailing = rank - first
    if trailing > 3:
        raise RuntimeError(f"Pad mode {mode}: padding {trailing} trailing dimensions is not supported by torch")
    lead = x.shape[:first]
    out = F.pad(x.reshape(-1, 1, *x.shape[first:]), torch_pads, mode=_MODES[mode])
    return out.reshape(*lead, *out.shape[2:])


class OnnxPad(nn.Module, OnnxToTorchModule):
    """ONNX Pad-11/13/18/19/21 with pads (and constant value) given as inputs."""

    def __init__(self, mode: str, axes: list[int] | None, has_value: bool):
        super().__init__()
        self.mode = mode
        self.axes = axes
        self.has_value = has_value

    def forward(self, x: torch.Tensor, pads: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
        fill = float(value) if value is not None and value.numel() else 0.0
        return pad_onnx(x, [int(p) for p in pads.reshape(-1).tolist()], self.mode, fill, self.axes)


def _pad_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = node.attributes.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in _MODES:
        raise NotImplementedError(f"Pad mode {mode} is not implemented")
    inputs = list(node.input_values) + ["", "", ""]
    axes = None
    if inputs[3] != "":
        try:
            axes = [int(a) for a in torch.as_tensor(get_const_value(inputs[3], graph)).reshape(-1).tolist()]
        except KeyError as exc:
            raise NotImplementedError("Pad with non-constant axes is not implemented") from exc
    mapped = [inputs[0], inputs[1]] + ([inputs[2]] if inputs[2] != "" else [])
    module = OnnxPad(mode, axes, inputs[2] != "")
    return OperationConverterResult(module, OnnxMapping(inputs=tuple(mapped), outputs=node.output_values))


def install_pad() -> None:
    """Use :class:`OnnxPad` for Pad-11 and later.

    onnx2torch's ``add_converter`` refuses to replace a registered converter and offers no other
    API, so the existing entries are replaced in its registry mapping (``_CONVERTER_REGISTRY``)."""
    for version in (11, 13, 18, 19, 21):
        description = registry.OperationDescription(domain="", operation_type="Pad", version=version)
        registry._CONVERTER_REGISTRY[description] = _pad_converter  # noqa: SLF001 - see docstring
