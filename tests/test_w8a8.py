"""W8A8 and 4-bit export details: Hessian shrinkage (OAS), MSE activation ranges, dynamic int8 activations
(DynamicQuantizeMatMul) and MatMulNBits with padded last blocks, each against an exact reference run
through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress.io.layer_rows import RowStatistics
from fls_compress.latency import kernel_census
from fls_compress.quantize import Grid, QuantSpec, quantize_model, quantize_weights
from fls_compress.quantize.act_ranges import ALPHAS, BINS, mse_range, uint8_params
from fls_compress.quantize.shrinkage import layer_hessian, oas_coefficient


def _run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> np.ndarray:
    o = ort.SessionOptions()
    if not optimize:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _stats(x: torch.Tensor) -> RowStatistics:
    st = RowStatistics(1, x.shape[1], full=True, max_rows=None)
    st.plan(x.shape[0])
    st.add(x[None])
    return st


def _fake_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale, zero = uint8_params(lo, hi)
    s, z = float(scale), float(zero)
    return (np.clip(np.round(x / s) + z, 0, 255) - z) * s


# ----------------------------------------------------------------------------------------- shrinkage
def test_oas_coefficient_closed_forms() -> None:
    assert oas_coefficient(torch.eye(5, dtype=torch.float64) * 3.0, 10) == 1.0  # already isotropic
    s = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    p, n, tr, tr2 = 2, 7, 5.0, 17.0  # eq. 23 of Chen et al. 2010 by hand
    expect = ((1 - 2 / p) * tr2 + tr * tr) / ((n + 1 - 2 / p) * (tr2 - tr * tr / p))
    assert oas_coefficient(s, n) == pytest.approx(min(1.0, expect))


def test_oas_hessian_keeps_the_mean_and_shrinks_towards_the_truth_when_rows_are_few() -> None:
    g = torch.Generator().manual_seed(0)
    p = 64
    mu = torch.linspace(-1.0, 1.0, p, dtype=torch.float64)
    true_h = 2.0 * (torch.eye(p, dtype=torch.float64) + torch.outer(mu, mu))
    few = torch.randn(32, p, generator=g, dtype=torch.float64) + mu  # n < p: the raw H is singular
    raw, rho0 = layer_hessian(_stats(few), 0, "none")
    shrunk, rho = layer_hessian(_stats(few), 0, "oas")
    assert rho0 == 0.0 and torch.equal(raw, _stats(few).hessian(0)) and 0.5 < rho <= 1.0
    assert torch.linalg.norm(shrunk - true_h) < 0.8 * torch.linalg.norm(raw - true_h)
    n = 32  # the mean part is kept exactly: H_hat = 2 [(1 - rho) C + rho tr(C)/p I + mu mu^T]
    m = few.mean(0)
    c = few.T @ few / n - torch.outer(m, m)
    expect = 2.0 * ((1 - rho) * c + rho * torch.trace(c) / p * torch.eye(p, dtype=torch.float64) + torch.outer(m, m))
    torch.testing.assert_close(shrunk, expect)
    many = torch.randn(20000, p, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, p, dtype=torch.float64)
    _, rho_many = layer_hessian(_stats(many), 0, "oas")
    assert rho_many < 0.01  # n >> p: H essentially unchanged


# ----------------------------------------------------------------------------------------- mse ranges
@pytest.mark.parametrize("kind", ["gauss", "laplace", "relu"])
def test_mse_range_picks_the_exact_least_squared_error_clip(kind: str) -> None:
    rng = np.random.default_rng(1)
    x = {"gauss": rng.standard_normal(200_000), "laplace": rng.laplace(size=200_000),
         "relu": np.maximum(rng.standard_normal(200_000) * 1.3 + 0.2, 0.0)}[kind]
    lo, hi = float(x.min()), float(x.max())
    hist = np.histogram(x[x != 0], bins=BINS, range=(lo, hi))[0].astype(np.float64)
    got = mse_range(hist, lo, hi)
    errors = [float(((_fake_uint8(x, a * min(lo, 0), a * max(hi, 0)) - x) ** 2).mean()) for a in ALPHAS]
    best = float(min(errors))
    assert float(((_fake_uint8(x, *got) - x) ** 2).mean()) <= best * 1.01  # the histogram estimate finds it
    assert best < errors[0]  # and clipping beats min/max on these tails


# ----------------------------------------------------------------------------------------- dynamic activations
def _mlp(rng, k=24, h=16, n_out=8):
    w1, b1 = rng.standard_normal((h, k)).astype(np.float32), rng.standard_normal(h).astype(np.float32)
    w2 = rng.standard_normal((h, n_out)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, b1


def test_int8_dynamic_matches_per_call_quantization_and_fuses(tmp_path) -> None:
    rng = np.random.default_rng(5)
    model, b1 = _mlp(rng)
    x = (rng.standard_normal((40, 24)) * 1.5 + 0.3).astype(np.float32)
    q, info = quantize_model(model, {"x": x}, method="rtn", bits=8, activations="int8-dynamic")
    onnx.checker.check_model(q, full_check=True)
    assert info["dynamic_int8_layers"] == 2.0 and info["dynamic_skipped"] == "" and info["static_activation_layers"] == ""
    weights, _ = quantize_weights(model, None, method="rtn", bits=8)
    w1 = weights["W1"].grid.dequantize(weights["W1"].codes).astype(np.float64)  # (out, in)
    w2 = weights["W2"].grid.dequantize(weights["W2"].codes).astype(np.float64)
    for batch in (x[:1], x[:17], x):  # the activation grid follows each call's min / max
        a = np.maximum(_fake_uint8(batch.astype(np.float64), batch.min(), batch.max()) @ w1.T + b1, 0.0).astype(np.float32)
        expect = _fake_uint8(a.astype(np.float64), a.min(), a.max()) @ w2.T
        np.testing.assert_allclose(_run(q, {"x": batch}), expect, rtol=1e-4, atol=1e-4)
    onnx.save(q, tmp_path / "dyn.onnx")
    census = kernel_census(tmp_path / "dyn.onnx")
    assert census["integer_kernels"] == {"DynamicQuantizeMatMul": 2} and not census["float_layer_kernels"]


def _conv_gemm(rng):
    wc = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    wg = rng.standard_normal((5, 4 * 4 * 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "Wg"], ["y"], transB=1)], "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(wc, "Wc"), numpy_helper.from_array(np.zeros(4, np.float32), "Bc"),
                     numpy_helper.from_array(wg, "Wg")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_int8_dynamic_keeps_static_ranges_for_convolutions(tmp_path) -> None:
    rng = np.random.default_rng(6)
    model = _conv_gemm(rng)
    x = rng.standard_normal((16, 2, 4, 4)).astype(np.float32)
    q, info = quantize_model(model, {"x": x}, method="rtn", bits=8, activations="int8-dynamic")
    assert info["dynamic_int8_layers"] == 1.0 and info["static_activation_layers"] == "Wc"
    onnx.save(q, tmp_path / "mixed.onnx")
    census = kernel_census(tmp_path / "mixed.onnx")
    assert census["integer_kernels"].get("QLinearConv") == 1 and not census["float_layer_kernels"]
    assert sum(v for k, v in census["integer_kernels"].items() if k != "QLinearConv") == 1  # the dynamic Gemm
    ref = _run(model, {"x": x})
    got = _run(q, {"x": x})
    assert np.linalg.norm(got - ref) < 0.05 * np.linalg.norm(ref)


def test_int4_convolutions_keep_float_inputs_under_int8_activations() -> None:
    rng = np.random.default_rng(10)
    model = _conv_gemm(rng)
    x = rng.standard_normal((16, 2, 4, 4)).astype(np.float32)
    q, info = quantize_model(model, {"x": x}, method="rtn", bits=4, activations="int8")
    assert info["float_activation_layers"] == "Wc" and info["matmul_nbits_weights"] == "Wg"
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)  # no integer kernel takes an int4 Conv
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert [a.i for a in nbits[0].attribute if a.name == "accuracy_level"] == [4]


def test_int8_dynamic_needs_no_calibration_without_convolutions() -> None:
    model, _ = _mlp(np.random.default_rng(7))
    q, info = quantize_model(model, None, method="rtn", bits=8, activations="int8-dynamic")
    assert info["dynamic_int8_layers"] == 2.0
    assert {n.op_type for n in q.graph.node} == {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Add", "Relu"}


# ----------------------------------------------------------------------------------------- 4-bit padding
def test_grid_block_with_a_shorter_last_block() -> None:
    w = np.random.default_rng(8).standard_normal((3, 10))
    g = Grid.fit(w, QuantSpec(4, True, "block:4"))
    assert g.scale.shape == (3, 3)
    np.testing.assert_allclose(g.scale[:, 2], (np.abs(w[:, 8:]).max(1) / 7).astype(np.float32))
    assert g.dequantize(g.codes(w)).shape == (3, 10)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "block:32", "block:16"])
def test_every_4bit_matmul_becomes_matmulnbits_with_padded_blocks(symmetric: bool, granularity: str) -> None:
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((50, 24)).astype(np.float32)  # K = 50: no power-of-two block >= 16 divides it
    w2, b2 = rng.standard_normal((20, 24)).astype(np.float32), rng.standard_normal(20).astype(np.float32)  # K = 24
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], transB=1)], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 20])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((16, 50)).astype(np.float32)
    weights, _ = quantize_weights(model, None, method="rtn", bits=4, symmetric=symmetric, granularity=granularity)
    deq = {n: wq.grid.dequantize(wq.codes).astype(np.float64) for n, wq in weights.items()}  # (out, in) views
    expect = (x.astype(np.float64) @ deq["W1"].T) @ deq["W2"].T + b2
    q, info = quantize_model(model, None, method="rtn", bits=4, symmetric=symmetric, granularity=granularity)
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits", "MatMulNBits"] and info["matmul_nbits"] == 2.0
    np.testing.assert_allclose(_run(q, {"x": x}), expect, rtol=1e-4, atol=1e-4)
    # the portable form: blocked DequantizeLinear with ceil(K / g) scales (onnxruntime's own kernels, unfused)
    qq, _ = quantize_model(model, None, method="rtn", bits=4, symmetric=symmetric, granularity=granularity,
                           matmul_format="qdq")
    assert "MatMulNBits" not in {n.op_type for n in qq.graph.node}
    np.testing.assert_allclose(_run(qq, {"x": x}, optimize=False), expect, rtol=1e-4, atol=1e-4)
