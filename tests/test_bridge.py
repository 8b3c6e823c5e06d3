"""Tests of the ONNX -> torch bridge: prep passes, compat converters, conversion and the name map.

Every conversion is checked numerically against onnxruntime on the same (original) graph, and
every mapped weight is round-tripped through write-back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress.bridge.compat import install_compat
from fls_compress.bridge.convert import TorchBridge, convert_to_torch, unsupported_ops
from fls_compress.bridge.prep import explicit_same_pads, prepare_for_torch
from fls_compress.errors import InvalidDataError, InvalidOptionError, UnsupportedModelError
from fls_compress.io.onnx_model import (
    ALL_PRUNABLE_OPS,
    load_onnx,
    prunable_sites,
    prunable_initializers,
    read_initializer_arrays,
    read_weight,
    write_back,
)

RNG = np.random.default_rng(1)
F32 = TensorProto.FLOAT


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _torch(bridge: TorchBridge, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outs = bridge.forward({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [o.numpy() for o in outs]


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    """A checked model; outputs given as plain names get their type from shape inference."""
    declared = [o for o in outputs if not isinstance(o, str)]
    graph = helper.make_graph(nodes, "g", inputs, declared, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if len(declared) < len(outputs):
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
        del model.graph.output[:]
        model.graph.output.extend(o if not isinstance(o, str) else inferred[o] for o in outputs)
    onnx.checker.check_model(model)
    return model


def _assert_matches_ort(bridge: TorchBridge, model: onnx.ModelProto, feeds, tol: float = 1e-5) -> float:
    """Max abs difference torch vs ORT, asserted below ``tol`` (relative once outputs exceed 1)."""
    got, ref = _torch(bridge, feeds), _ort(model, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
    diff = max(float(np.max(np.abs(g - r), initial=0.0)) for g, r in zip(got, ref))
    scale = max(1.0, *(float(np.max(np.abs(r), initial=0.0)) for r in ref))
    assert diff < tol * scale
    return diff


def _prune_and_check_round_trip(bridge: TorchBridge, model: onnx.ModelProto, feeds, tol: float = 1e-5) -> None:
    """Zero half of each weight's matrix view in torch, write back, and compare torch with ORT."""
    with torch.no_grad():
        for weight in bridge.weights.values():
            matrix = weight.to_matrix(weight.parameter.detach().clone())
            matrix[:, ::2] = 0.0
            weight.parameter.copy_(weight.from_matrix(matrix))
    arrays = {name: w.to_onnx() for name, w in bridge.weights.items()}
    pruned = write_back(model, arrays)
    onnx.checker.check_model(pruned)
    for name in arrays:
        assert np.mean(read_weight(pruned, name) == 0) >= 0.45
    _assert_matches_ort(bridge, pruned, feeds, tol)


# ------------------------------------------------------------------------------------------------
# Gemm / MatMul layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trans_b", "alpha"), [(0, 0.5), (1, 2.0), (1, 1.0)])
def test_gemm_layouts_round_trip(trans_b: int, alpha: float) -> None:
    w = _rand(12, 6) if trans_b == 0 else _rand(6, 12)
    model = _model(
        [helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="fc", transB=trans_b, alpha=alpha, beta=0.75)],
        [helper.make_tensor_value_info("X", F32, [3, 12])],
        [helper.make_tensor_value_info("Y", F32, [3, 6])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(_rand(6), "C")],
    )
    bridge = convert_to_torch(model)
    weight = bridge.weights["W"]
    assert (weight.op_type, weight.transpose, weight.scale, weight.matrix_transpose) == (
        "Gemm", trans_b == 0, alpha, False)
    assert weight.matrix_shape == (6, 12)
    assert isinstance(weight.parameter, torch.nn.Parameter) and weight.parameter.requires_grad
    np.testing.assert_allclose(weight.to_onnx(), w, rtol=1e-6)
    assert [n for n, p in bridge.module.named_parameters() if p.requires_grad] == ["fc.weight"]
    feeds = {"X": _rand(3, 12)}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


def test_gemm_kept_as_op_promotes_its_buffer() -> None:
    """transA=1 makes onnx2torch keep a generic Gemm whose B is a buffer: it must be promoted."""
    w = _rand(12, 6)
    model = _model(
        [helper.make_node("Gemm", ["X", "W"], ["Y"], name="fc", transA=1, alpha=1.5)],
        [helper.make_tensor_value_info("X", F32, [12, 3])],
        [helper.make_tensor_value_info("Y", F32, [3, 6])],
        [numpy_helper.from_array(w, "W")],
    )
    bridge = convert_to_torch(model)
    weight = bridge.weights["W"]
    assert (weight.transpose, weight.scale, weight.matrix_transpose, weight.matrix_shape) == (False, 1.0, True, (6, 12))
    assert [n for n, p in bridge.module.named_parameters() if p.requires_grad] == ["initializers.onnx_initializer_0"]
    feeds = {"X": _rand(12, 3)}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


def _transformer_block(shared: bool = False) -> onnx.ModelProto:
    """LayerNorm -> MatMul(Wq) / MatMul(Wk) -> scores -> Softmax -> MatMul(V) -> MatMul(Wo) + bias."""
    d = 16
    wk_name = "Wq" if shared else "Wk"
    nodes = [
        helper.make_node("LayerNormalization", ["X", "ln_s", "ln_b"], ["xn"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["xn", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["xn", wk_name], ["k"], name="k_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "xn"], ["ctx"], name="ctx"),
        helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["o", "bo"], ["Y"], name="o_bias"),
    ]
    inits = [
        numpy_helper.from_array(np.ones(d, np.float32), "ln_s"),
        numpy_helper.from_array(np.zeros(d, np.float32), "ln_b"),
        numpy_helper.from_array(_rand(d, d) * 0.3, "Wq"),
        numpy_helper.from_array(_rand(d, 24) * 0.3, "Wo"),
        numpy_helper.from_array(_rand(24), "bo"),
    ]
    if not shared:
        inits.append(numpy_helper.from_array(_rand(d, d) * 0.3, "Wk"))
    return _model(
        nodes,
        [helper.make_tensor_value_info("X", F32, [2, 5, d])],
        [helper.make_tensor_value_info("Y", F32, [2, 5, 24])],
        inits,
    )


def test_matmul_weights_are_promoted_parameters() -> None:
    model = _transformer_block()
    bridge = convert_to_torch(model)
    assert list(bridge.weights) == ["Wq", "Wk", "Wo"]
    for name, weight in bridge.weights.items():
        assert weight.op_type == "MatMul" and weight.matrix_transpose and not weight.transpose
        assert weight.parameter.requires_grad
        np.testing.assert_array_equal(weight.to_onnx(), read_initializer_arrays(model)[name])
    assert bridge.weights["Wo"].matrix_shape == (24, 16)
    trainable = [p for p in bridge.module.parameters() if p.requires_grad]
    assert len(trainable) == 3  # the LayerNorm affine and the bias stay frozen
    assert sum(p.numel() for p in bridge.module.parameters() if not p.requires_grad) == 32

    feeds = {"X": _rand(2, 5, 16)}
    _assert_matches_ort(bridge, model, feeds)
    out = bridge.forward({"X": torch.from_numpy(feeds["X"])})
    out[0].square().sum().backward()
    assert all(w.parameter.grad is not None and w.parameter.grad.abs().sum() > 0 for w in bridge.weights.values())
    _prune_and_check_round_trip(bridge, model, feeds)


def test_shared_initializer_becomes_one_tied_parameter() -> None:
    model = _transformer_block(shared=True)
    bridge = convert_to_torch(model)
    assert list(bridge.weights) == ["Wq", "Wo"]
    wq = bridge.weights["Wq"]
    assert wq.consumers == ("q_proj", "k_proj")
    params = [p for p in bridge.module.parameters() if p.requires_grad]
    assert len(params) == 2 and any(p is wq.parameter for p in params)
    # every copy onnx2torch made of Wq now is that same Parameter object, and no buffer is left
    holders = [t for _, t in bridge.module.named_parameters(remove_duplicate=False) if t is wq.parameter]
    assert len(holders) == 2
    assert not any(b.shape == (16, 16) for b in bridge.module.buffers())

    feeds = {"X": _rand(2, 5, 16)}
    _assert_matches_ort(bridge, model, feeds)
    # the gradient sums over both uses: compare with plain torch on the same weights
    x = torch.from_numpy(feeds["X"])
    bridge.forward({"X": x})[0].sum().backward()
    arrays = {k: torch.from_numpy(v.copy()) for k, v in read_initializer_arrays(model).items()}
    w = arrays["Wq"].clone().requires_grad_(True)
    xn = torch.nn.functional.layer_norm(x, (16,), arrays["ln_s"], arrays["ln_b"])
    p = torch.softmax((xn @ w) @ (xn @ w).transpose(1, 2), dim=-1)
    ((p @ xn) @ arrays["Wo"] + arrays["bo"]).sum().backward()
    torch.testing.assert_close(wq.parameter.grad, w.grad, rtol=1e-4, atol=1e-5)

    _prune_and_check_round_trip(bridge, model, feeds)


def test_identity_wrapped_weight_maps_to_the_initializer() -> None:
    model = _model(
        [
            helper.make_node("Identity", ["W"], ["W_id"]),
            helper.make_node("MatMul", ["X", "W_id"], ["Y"], name="mm"),
        ],
        [helper.make_tensor_value_info("X", F32, [3, 8])],
        [helper.make_tensor_value_info("Y", F32, [3, 4])],
        [numpy_helper.from_array(_rand(8, 4), "W")],
    )
    bridge = convert_to_torch(model)
    assert list(bridge.weights) == ["W"]
    feeds = {"X": _rand(3, 8)}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


# ------------------------------------------------------------------------------------------------
# prep passes
# ------------------------------------------------------------------------------------------------
def test_constant_node_weights_convert() -> None:
    w = _rand(4, 3, 3, 3)
    m = _rand(4 * 6 * 6, 5)
    model = _model(
        [
            helper.make_node("Constant", [], ["cw"], value=numpy_helper.from_array(w)),
            helper.make_node("Conv", ["X", "cw"], ["c"], name="conv"),
            helper.make_node("Constant", [], ["shape"], value_ints=[1, -1]),
            helper.make_node("Reshape", ["c", "shape"], ["flat"]),
            helper.make_node("Constant", [], ["cm"], value=numpy_helper.from_array(m)),
            helper.make_node("MatMul", ["flat", "cm"], ["Y"], name="mm"),
        ],
        [helper.make_tensor_value_info("X", F32, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", F32, [1, 5])],
        [],
        opset=13,
    )
    prepared = prepare_for_torch(model)
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Reshape", "MatMul"]
    assert {t.name for t in prepared.graph.initializer} == {"cw", "shape", "cm"}
    assert len(model.graph.initializer) == 0  # the input model is untouched
    bridge = convert_to_torch(model)
    assert set(bridge.weights) == {"cw", "cm"}  # Constant-node weights are prunable sites
    feeds = {"X": _rand(1, 3, 8, 8)}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_same_padding_conv(auto_pad: str) -> None:
    model = _model(
        [
            helper.make_node("Conv", ["X", "W"], ["c"], name="conv", auto_pad=auto_pad),
            helper.make_node("MaxPool", ["c"], ["Y"], kernel_shape=[2, 2], auto_pad=auto_pad),
        ],
        [helper.make_tensor_value_info("X", F32, [1, 2, 9, 9])],
        [helper.make_tensor_value_info("Y", F32, [1, 3, 9, 9])],
        [numpy_helper.from_array(_rand(3, 2, 4, 3), "W")],
    )
    pads = {n.op_type: helper.get_attribute_value(next(a for a in n.attribute if a.name == "pads"))
            for n in explicit_same_pads(model).graph.node}
    if auto_pad == "SAME_UPPER":
        assert pads == {"Conv": [1, 1, 2, 1], "MaxPool": [0, 0, 1, 1]}
    else:
        assert pads == {"Conv": [2, 1, 1, 1], "MaxPool": [1, 1, 0, 0]}
    bridge = convert_to_torch(model)
    assert list(bridge.weights) == ["W"]
    feeds = {"X": _rand(1, 2, 9, 9)}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


def test_empty_optional_inputs_and_allowzero() -> None:
    model = _model(
        [
            helper.make_node("Clip", ["X", "lo", ""], ["c"]),
            helper.make_node("Reshape", ["c", "shape"], ["Y"], allowzero=1),
        ],
        [helper.make_tensor_value_info("X", F32, [2, 6])],
        [helper.make_tensor_value_info("Y", F32, [3, 4])],
        [numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
         numpy_helper.from_array(np.array([3, 4], np.int64), "shape")],
        opset=18,
    )
    bridge = convert_to_torch(model)
    _assert_matches_ort(bridge, model, {"X": _rand(2, 6)})


# ------------------------------------------------------------------------------------------------
# compat converters
# ------------------------------------------------------------------------------------------------
def test_compat_newer_opset_converters() -> None:
    install_compat()
    install_compat()  # idempotent
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("ReduceMean", ["X", "ax_m"], ["rm"], keepdims=0),
        helper.make_node("ReduceMax", ["X", "ax_x"], ["rx"], keepdims=1),
        helper.make_node("ReduceL2", ["X"], ["r2"], keepdims=0),
        helper.make_node("ReduceSum", ["X", "ax_m"], ["rs"], keepdims=0),
        helper.make_node("Gelu", ["X"], ["gn"]),
        helper.make_node("Gelu", ["X"], ["gt"], approximate="tanh"),
        helper.make_node("Split", ["X"], ["s0", "s1"], axis=2, num_outputs=2),
        helper.make_node("Reshape", ["X", "shape"], ["rz"], allowzero=1),
        helper.make_node("Shape", ["X"], ["shp"], start=1),
        helper.make_node("Cast", ["shp"], ["shp_f"], to=TensorProto.FLOAT),
        helper.make_node("GreaterOrEqual", ["X", "zero"], ["ge"]),
        helper.make_node("Cast", ["ge"], ["ge_f"], to=TensorProto.FLOAT),
        helper.make_node("Pad", ["X", "pads", "pv"], ["pd"]),
        helper.make_node("Transpose", ["X"], ["tr"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["X", "ax_u"], ["us"]),
        helper.make_node("Flatten", ["X"], ["fl"], axis=2),
    ]
    outs = ["rm", "rx", "r2", "rs", "gn", "gt", "s0", "s1", "rz", "shp_f", "ge_f", "pd", "tr", "us", "fl"]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("X", F32, [2, 3, 5])],
        outs,
        [
            i64("ax_m", [-1, 0]), i64("ax_x", [1]), i64("shape", [5, 6]), i64("pads", [0, 1, 0, 0, 0, 2]),
            i64("ax_u", [0]), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(1.5, np.float32), "pv"),
        ],
        opset=21,
    )
    assert unsupported_ops(model) == []
    bridge = convert_to_torch(model)
    assert bridge.output_names == outs
    diff = _assert_matches_ort(bridge, model, {"X": _rand(2, 3, 5)})
    assert diff < 1e-5
    split = _torch(bridge, {"X": _rand(2, 3, 5)})
    assert split[6].shape == (2, 3, 3) and split[7].shape == (2, 3, 2)  # ceil(5/2), then the rest


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_every_rank_and_mode_matches_onnxruntime(mode: str) -> None:
    """2-D reflect padding (audio [batch, time], as in Silero VAD), a 3-D tensor padded on two axes,
    and the opset-18 ``axes`` input, each against onnxruntime."""
    for shape, pads, axes in (([2, 7], [0, 3, 0, 2], None), ([2, 5, 6], [0, 1, 2, 0, 2, 1], None), ([2, 3, 6], [2, 1], [-1])):
        inits = [numpy_helper.from_array(np.array(pads, np.int64), "pads")]
        inputs = ["X", "pads"]
        if axes is not None:
            inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
            inputs += ["", "axes"]
        model = _model([helper.make_node("Cast", ["pads"], ["p"], to=TensorProto.INT64),
                        helper.make_node("Pad", ["X", "p"] + inputs[2:], ["Y"], mode=mode)],
                       [helper.make_tensor_value_info("X", F32, shape)], ["Y"], inits, opset=19)
        x = _rand(*shape)
        bridge = convert_to_torch(model)
        np.testing.assert_array_equal(_torch(bridge, {"X": x})[0], _ort(model, {"X": x})[0])


def test_size_and_lstm_weights_computed_from_constants() -> None:
    """The TorchScript exporter can write LSTM weights as Concat(Slice(W)) chains; they are
    evaluated once for conversion. Size (no onnx2torch converter) is supported."""
    hidden = 3
    w = _rand(1, 4 * hidden, 2)
    nodes = [
        helper.make_node("Slice", ["W_raw", "s0", "s1", "ax"], ["w_a"]),
        helper.make_node("Slice", ["W_raw", "s1", "s2", "ax"], ["w_b"]),
        helper.make_node("Concat", ["w_b", "w_a"], ["W"], axis=1),
        helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=hidden),
        helper.make_node("Size", ["Y"], ["n"]),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["Y", "nf"], ["Z"]),
    ]
    model = _model(
        nodes, [helper.make_tensor_value_info("X", F32, [4, 2, 2])], ["Z"],
        [numpy_helper.from_array(w, "W_raw"), numpy_helper.from_array(_rand(1, 4 * hidden, hidden), "R"),
         numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([hidden], np.int64), "s1"),
         numpy_helper.from_array(np.array([4 * hidden], np.int64), "s2"), numpy_helper.from_array(np.array([1], np.int64), "ax")],
        opset=14,
    )
    bridge = convert_to_torch(model)
    assert bridge.info["computed_recurrent_weights"] == ["W"]
    assert set(bridge.weights) == {"R"}  # W is computed, not a stored tensor of the graph
    _assert_matches_ort(bridge, model, {"X": _rand(4, 2, 2)})


# ------------------------------------------------------------------------------------------------
# unsupported models and bad inputs
# ------------------------------------------------------------------------------------------------
def _recurrent(op: str, direction: str, hidden: int = 4, features: int = 3, layout: int = 0,
               with_state: bool = True, **attrs) -> onnx.ModelProto:
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    inits = [
        numpy_helper.from_array(_rand(dirs, gates * hidden, features), "W"),
        numpy_helper.from_array(_rand(dirs, gates * hidden, hidden), "R"),
        numpy_helper.from_array(_rand(dirs, 2 * gates * hidden), "B"),
    ]
    state_shape = [dirs, 2, hidden] if layout == 0 else [2, dirs, hidden]
    inputs = [helper.make_tensor_value_info("X", F32, [5, 2, features] if layout == 0 else [2, 5, features])]
    node_inputs = ["X", "W", "R", "B", ""]
    if with_state:
        inputs.append(helper.make_tensor_value_info("h0", F32, state_shape))
        node_inputs.append("h0")
        if op == "LSTM":
            inputs.append(helper.make_tensor_value_info("c0", F32, state_shape))
            node_inputs.append("c0")
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, node_inputs, outputs, hidden_size=hidden, direction=direction, layout=layout, **attrs)
    return _model([node], inputs, outputs, inits, opset=14)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
@pytest.mark.parametrize(("direction", "layout"), [("forward", 0), ("reverse", 0), ("bidirectional", 0)])
def test_recurrent_layers_match_onnxruntime_and_prune(op: str, direction: str, layout: int) -> None:
    attrs = {"linear_before_reset": 1} if op == "GRU" else {}
    model = _recurrent(op, direction, layout=layout, **attrs)
    feeds = {vi.name: _rand(*[d.dim_value for d in vi.type.tensor_type.shape.dim]) for vi in model.graph.input}
    assert prunable_sites(model) == []  # recurrent weights only when asked for (the bridge asks)
    assert [(s.name, s.input_index) for s in prunable_sites(model, ALL_PRUNABLE_OPS)] == [("W", 1), ("R", 2)]
    bridge = convert_to_torch(model)
    assert set(bridge.weights) == {"W", "R"}
    assert bridge.weights["W"].matrix_shape == ((2 if direction == "bidirectional" else 1) * (4 if op == "LSTM" else 3) * 4, 3)
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


def test_recurrent_variants_torch_cannot_express_are_refused() -> None:
    gru = _recurrent("GRU", "forward", linear_before_reset=0)
    with pytest.raises(UnsupportedModelError, match="linear_before_reset=0"):
        convert_to_torch(gru)
    with pytest.raises(UnsupportedModelError, match="layout=1"):
        convert_to_torch(_recurrent("LSTM", "forward", layout=1))
    assert unsupported_ops(_recurrent("LSTM", "forward")) == []


def _if_model() -> onnx.ModelProto:
    """Y = If(sr == 16000, MatMul(X, Wa), Relu(MatMul(X, Wb))) with a rank-0 int64 input sr."""
    def branch(name: str, weight: str, relu: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["X", weight], [f"{name}_mm"])]
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_mm"], [name]))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_mm"], [name]))
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(name, F32, None)])

    return _model(
        [
            helper.make_node("MatMul", ["X", "W0"], ["h"], name="pre"),
            helper.make_node("Equal", ["sr", "rate"], ["cond"]),
            helper.make_node("If", ["cond"], ["Z"], name="rate_switch",
                             then_branch=branch("a", "Wa", False), else_branch=branch("b", "Wb", True)),
            helper.make_node("Add", ["Z", "h"], ["Y"]),
        ],
        [helper.make_tensor_value_info("X", F32, ["N", 3]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("Y", F32, ["N", 4])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate"), numpy_helper.from_array(_rand(3, 4), "W0"),
         numpy_helper.from_array(_rand(3, 4), "Wa"), numpy_helper.from_array(_rand(3, 4), "Wb")],
        opset=16,
    )


@pytest.mark.parametrize("rate", [16000, 8000])
def test_if_on_a_constant_input_is_folded_for_the_calibration_data(rate: int) -> None:
    from fls_compress.io.calibration import CalibrationData

    model = _if_model()
    with pytest.raises(UnsupportedModelError, match=r"If \(opset 16\).*-m sparsegpt\|wanda"):
        convert_to_torch(model)
    x = _rand(6, 3)
    calib = CalibrationData({"X": x}, None, synthetic=False, source="mem", constants={"sr": np.array(rate, np.int64)})
    bridge = convert_to_torch(model, calibration=calib)
    assert bridge.input_names == ["X"] and bridge.info["bound_inputs"] == ["sr"]
    taken = "then_branch" if rate == 16000 else "else_branch"
    assert [(f["node"], f["condition"], f["branch"]) for f in bridge.info["folded_ifs"]] == [("rate_switch", rate == 16000, taken)]
    assert set(bridge.weights) == {"W0"}  # weights inside branches are not top-level sites
    got = _torch(bridge, {"X": x})[0]
    np.testing.assert_allclose(got, _ort(model, {"X": x, "sr": np.array(rate, np.int64)})[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_after_computed_reshape_gets_observed_shapes() -> None:
    from fls_compress.io.calibration import CalibrationData

    model = _model(
        [
            helper.make_node("Conv", ["X", "cw"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Shape", ["c"], ["s"]),
            helper.make_node("Add", ["one", "one"], ["two"]),  # computed, so the Slice length is unknown
            helper.make_node("Slice", ["s", "zero", "two"], ["dims"]),
            helper.make_node("Concat", ["dims", "tail"], ["target"], axis=0),
            helper.make_node("Reshape", ["c", "target"], ["r"]),
            helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["bn"]),
            helper.make_node("Relu", ["bn"], ["Y"]),
        ],
        [helper.make_tensor_value_info("X", F32, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("Y", F32, ["N", 3, 16])],
        [numpy_helper.from_array(_rand(3, 2, 3, 3), "cw"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(np.array([16], np.int64), "tail")]
        + [numpy_helper.from_array(np.abs(_rand(3)) + 0.5, n) for n in ("g", "b", "m", "v")],
    )
    with pytest.raises(UnsupportedModelError, match="spatial rank"):
        convert_to_torch(model)
    x = _rand(3, 2, 4, 4)
    bridge = convert_to_torch(model, calibration=CalibrationData({"X": x}, None, synthetic=False, source="mem"))
    assert bridge.info["observed_shapes"] >= 1
    _assert_matches_ort(bridge, model, {"X": x})
    _prune_and_check_round_trip(bridge, model, {"X": x})


@pytest.mark.parametrize(("elem", "dtype"), [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)])
def test_fp16_and_float64_models_compute_in_float32(elem: int, dtype: type) -> None:
    w1, w2 = _rand(6, 8).astype(dtype), _rand(8, 3).astype(dtype)
    model = _model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Cast", ["r"], ["rc"], to=elem), helper.make_node("Gemm", ["rc", "W2"], ["Y"])],
        [helper.make_tensor_value_info("X", elem, ["N", 6])],
        [helper.make_tensor_value_info("Y", elem, ["N", 3])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    bridge = convert_to_torch(model)
    assert bridge.info["compute_dtype"].startswith("float32 (model stores")
    assert {w.onnx_dtype for w in bridge.weights.values()} == {np.dtype(dtype)}
    x = _rand(4, 6).astype(dtype)
    _assert_matches_ort(bridge, model, {"X": x}, tol=2e-2 if dtype == np.float16 else 1e-5)
    arrays = {n: w.to_onnx() for n, w in bridge.weights.items()}
    assert all(a.dtype == dtype for a in arrays.values())
    np.testing.assert_array_equal(arrays["W1"], w1)
    _prune_and_check_round_trip(bridge, model, {"X": x}, tol=2e-2 if dtype == np.float16 else 1e-5)


def test_bad_options_and_feeds() -> None:
    model = _transformer_block()
    with pytest.raises(InvalidOptionError):
        convert_to_torch(model, prunable_ops=("Conv", "BatchNormalization"))
    bridge = convert_to_torch(model, prunable_ops=("Gemm",))
    assert bridge.weights == {} and not any(p.requires_grad for p in bridge.module.parameters())
    with pytest.raises(InvalidDataError):
        bridge.forward({"x": torch.zeros(2, 5, 16)})


# ------------------------------------------------------------------------------------------------
# real exports
# ------------------------------------------------------------------------------------------------
def _export(module: torch.nn.Module, args: tuple, path: Path, **kwargs) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), **kwargs)
    return load_onnx(path)


def test_resnet18_export_converts_and_maps_every_weight(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    model = _export(net, (x,), tmp_path / "r18.onnx", dynamo=False, opset_version=13, input_names=["image"])
    bridge = convert_to_torch(model)
    assert bridge.input_names == ["image"]
    assert len(bridge.weights) == 21 == len(prunable_initializers(model))
    assert sum(w.op_type == "Conv" for w in bridge.weights.values()) == 20
    assert bridge.weights["fc.weight"].op_type == "Gemm"
    assert sum(w.numel for w in bridge.weights.values()) == sum(
        p.numel() for n, p in net.named_parameters() if n.endswith("weight") and p.dim() > 1
    )
    _assert_matches_ort(bridge, model, {"image": x.numpy()}, tol=1e-4)


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():  # the layers start as deep copies; make them differ
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return encoder


class _SmallCnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.nn.functional.gelu(self.conv2(x), approximate="tanh")
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), dim=-1)


def test_dynamo_cnn_export_needs_compat(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _export(_SmallCnn().eval(), (x,), tmp_path / "cnn.onnx", dynamo=True)
    assert {"Gelu", "ReduceMean"} <= {n.op_type for n in model.graph.node}  # Gelu-20, ReduceMean-18
    bridge = convert_to_torch(model)
    assert [w.op_type for w in bridge.weights.values()] == ["Conv", "Conv", "Gemm"]
    feeds = {bridge.input_names[0]: x.numpy()}
    _assert_matches_ort(bridge, model, feeds)
    _prune_and_check_round_trip(bridge, model, feeds)


@pytest.mark.parametrize("dynamo", [False, True])
def test_transformer_encoder_export_converts(tmp_path: Path, dynamo: bool) -> None:
    encoder = _encoder()
    x = torch.randn(2, 5, 32)
    kwargs = {"dynamo": True} if dynamo else {"dynamo": False, "opset_version": 17}
    model = _export(encoder, (x,), tmp_path / "enc.onnx", **kwargs)
    if dynamo:
        assert model.opset_import[0].version >= 18
    sites = prunable_initializers(model)
    bridge = convert_to_torch(model)
    assert list(bridge.weights) == [s.name for s in sites]
    assert len(bridge.weights) == 8  # in_proj, out_proj, linear1, linear2 per layer
    assert sorted(w.op_type for w in bridge.weights.values()).count("MatMul") >= 6
    feeds = {bridge.input_names[0]: x.numpy()}
    _assert_matches_ort(bridge, model, feeds, tol=1e-4)
    _prune_and_check_round_trip(bridge, model, feeds, tol=1e-4)
