"""onnx2torch converters for ONNX ``LSTM``, ``GRU`` and ``RNN`` (onnx2torch 1.5 has none).

The module keeps the ONNX weights ``W`` ``[dirs, G*H, I]`` and ``R`` ``[dirs, G*H, H]`` as trainable
parameters in ONNX layout, so the bridge maps them one to one to the ONNX tensors (they are
prunable, with the (out, in) matrix view ``[dirs*G*H, I]``), and computes with ``torch.nn.LSTM`` /
``torch.nn.GRU`` (through ``torch.func.functional_call``) after reordering the gate blocks:

* LSTM (Hochreiter & Schmidhuber 1997; ONNX operator spec, LSTM-14): ONNX stacks gates as
  ``i, o, f, c``, torch as ``i, f, g(=c), o`` -> torch block ``k`` is ONNX block ``[0, 2, 3, 1][k]``;
  the bias ``B = [Wb; Rb]`` becomes ``bias_ih`` / ``bias_hh`` with the same reorder.
* GRU (Cho et al. 2014; ONNX GRU-14): ONNX ``z, r, h``, torch ``r, z, n`` -> ``[1, 0, 2]``.
* RNN (Elman 1990; ONNX RNN-14): one gate, ``H_t = tanh(X_t W^T + H_{t-1} R^T + Wb + Rb)`` as
  ``torch.nn.RNN``; only the default ``Tanh`` activation.
  torch's cell applies the reset gate after the recurrent matmul, which is ONNX
  ``linear_before_reset=1``; ``linear_before_reset=0`` is refused.

Outputs follow the ONNX layout: ``Y`` ``[seq, dirs, batch, H]``, ``Y_h`` / ``Y_c`` ``[dirs, batch, H]``.
``direction="reverse"`` runs torch on the time-reversed sequence. Refused (raise
``NotImplementedError``, reported as unsupported): non-default activations, ``clip``,
``input_forget``, peepholes, a non-empty ``sequence_lens``, non-constant W/R/B, and ``layout=1``
(which onnxruntime, the verification reference, cannot run either).
"""

from __future__ import annotations

import torch
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, get_const_value
from torch import nn
from torch.func import functional_call

#: torch gate block k is ONNX gate block ORDER[op][k]
GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_TORCH_LAYER = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def _reorder(t: torch.Tensor, order: tuple[int, ...], hidden: int) -> torch.Tensor:
    """Rows of ``t`` (first axis = gates*hidden) with the gate blocks permuted by ``order``."""
    return torch.cat([t[g * hidden : (g + 1) * hidden] for g in order], dim=0)


class OnnxRecurrent(nn.Module, OnnxToTorchModule):
    """ONNX LSTM / GRU with W, R as parameters in ONNX layout (see the module docstring)."""

    def __init__(
        self,
        op_type: str,
        weight: torch.Tensor,
        recurrence: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        reverse: bool,
        has_initial_h: bool,
        has_initial_c: bool,
        num_outputs: int,
    ):
        super().__init__()
        self.op_type = op_type
        self.W = nn.Parameter(weight.detach().clone().float())
        self.R = nn.Parameter(recurrence.detach().clone().float())
        dirs, gates_hidden, inputs = weight.shape
        self.hidden = int(recurrence.shape[-1])
        self.dirs = int(dirs)
        self.reverse = reverse
        self.has_initial_h = has_initial_h
        self.has_initial_c = has_initial_c
        self.num_outputs = num_outputs
        if bias is None:
            bias = torch.zeros(self.dirs, 2 * gates_hidden)
        self.register_buffer("B", bias.detach().clone().float())
        self.template = _TORCH_LAYER[op_type](int(inputs), self.hidden, bidirectional=self.dirs == 2)
        for param in self.template.parameters():
            param.requires_grad_(False)

    def _torch_params(self) -> dict[str, torch.Tensor]:
        order, h = GATE_ORDER[self.op_type], self.hidden
        gh = len(order) * h
        params = {}
        for d in range(self.dirs):
            suffix = "_l0" + ("_reverse" if d == 1 else "")
            params["weight_ih" + suffix] = _reorder(self.W[d], order, h)
            params["weight_hh" + suffix] = _reorder(self.R[d], order, h)
            params["bias_ih" + suffix] = _reorder(self.B[d, :gh], order, h)
            params["bias_hh" + suffix] = _reorder(self.B[d, gh:], order, h)
        return params

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = list(states)
        h0 = states.pop(0) if self.has_initial_h else None
        c0 = states.pop(0) if self.has_initial_c else None
        batch = x.shape[1]
        zeros = x.new_zeros(self.dirs, batch, self.hidden)
        h0 = zeros if h0 is None else h0.to(x.dtype)
        if self.reverse:
            x = torch.flip(x, dims=[0])
        if self.op_type == "LSTM":
            c0 = zeros if c0 is None else c0.to(x.dtype)
            y, (hn, cn) = functional_call(self.template, self._torch_params(), (x, (h0, c0)))
        else:
            y, hn = functional_call(self.template, self._torch_params(), (x, h0))
            cn = None
        if self.reverse:
            y = torch.flip(y, dims=[0])
        y = y.reshape(y.shape[0], batch, self.dirs, self.hidden).permute(0, 2, 1, 3)  # [seq, dirs, batch, H]
        outputs = (y, hn) if cn is None else (y, hn, cn)
        return outputs[: self.num_outputs] if self.num_outputs > 1 else outputs[0]


def _recurrent_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    op = node.operation_type
    attrs = node.attributes
    inputs = list(node.input_values) + [""] * 8
    activations = attrs.get("activations")
    if activations is not None and [a if isinstance(a, str) else a.decode() for a in activations] not in (
        _DEFAULT_ACTIVATIONS[op], _DEFAULT_ACTIVATIONS[op] * 2
    ):
        raise NotImplementedError(f"{op} with activations {activations} is not implemented")
    if attrs.get("clip") is not None:
        raise NotImplementedError(f"{op} with clip is not implemented")
    if op == "LSTM" and (attrs.get("input_forget", 0) != 0 or inputs[7] != ""):
        raise NotImplementedError("LSTM with input_forget or peepholes is not implemented")
    if op == "GRU" and attrs.get("linear_before_reset", 0) != 1:
        raise NotImplementedError("GRU with linear_before_reset=0 is not implemented (torch resets after the matmul)")
    if int(attrs.get("layout", 0)) != 0:
        raise NotImplementedError(f"{op} with layout=1 is not implemented")
    if inputs[4] != "":
        raise NotImplementedError(f"{op} with a sequence_lens input is not implemented")
    direction = attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    try:
        weight = torch.as_tensor(get_const_value(inputs[1], graph))
        recurrence = torch.as_tensor(get_const_value(inputs[2], graph))
        bias = torch.as_tensor(get_const_value(inputs[3], graph)) if inputs[3] != "" else None
    except KeyError as exc:
        raise NotImplementedError(f"{op} with non-constant weights is not implemented") from exc
    has_h = inputs[5] != ""
    has_c = op == "LSTM" and inputs[6] != ""
    module = OnnxRecurrent(
        op,
        weight,
        recurrence,
        bias,
        reverse=direction == "reverse",
        has_initial_h=has_h,
        has_initial_c=has_c,
        num_outputs=len(node.output_values),
    )
    mapped = [inputs[0]] + ([inputs[5]] if has_h else []) + ([inputs[6]] if has_c else [])
    return OperationConverterResult(module, OnnxMapping(inputs=tuple(mapped), outputs=node.output_values))


def install_recurrent() -> None:
    """Register the LSTM/GRU/RNN converters for every opset version of the ops (idempotent)."""
    for op, versions in (("LSTM", (7, 14)), ("GRU", (7, 14)), ("RNN", (7, 14))):
        for version in versions:
            try:
                get_converter(operation_type=op, version=version)
            except NotImplementedError:
                add_converter(operation_type=op, version=version)(_recurrent_converter)
