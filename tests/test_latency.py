"""The report's latency block, the kernels onnxruntime runs for our int8/int4 outputs, and the activation
range methods against closed forms. No timing assertions: only the block's fields and the kernel census."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress import GPTQConfig, MagnitudeConfig, RTNConfig, RunOptions, compress, verify
from fls_compress.batch.runner import key_metrics
from fls_compress.errors import InvalidOptionError
from fls_compress.latency import kernel_census
from fls_compress.quantize import quantize_model, quantize_weights
from fls_compress.quantize.act_ranges import BINS, activation_ranges, entropy_threshold

RUN = RunOptions(progress=False, seed=0, latency_runs=3)


def _save(tmp_path, nodes, inits, x_shape, y_shape, name="m", opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def gemm_mlp(tmp_path):
    """Gemm 16 -> 32 (ReLU) -> 32 (ReLU) -> 10 logits, with biases; 96 Gaussian samples."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(32, 16)).astype(np.float32) / 4, "b1": rng.normal(size=32).astype(np.float32) / 10,
             "w2": rng.normal(size=(32, 32)).astype(np.float32) / 6, "b2": rng.normal(size=32).astype(np.float32) / 10,
             "w3": rng.normal(size=(10, 32)).astype(np.float32) / 6, "b3": rng.normal(size=10).astype(np.float32) / 10}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, inits, ["n", 16], ["n", 10], "mlp")
    np.savez(tmp_path / "mlp.npz", x=rng.normal(size=(96, 16)).astype(np.float32))
    return path, tmp_path / "mlp.npz"


def small_cnn(tmp_path):
    """Conv(3x3, bias) -> ReLU -> MaxPool -> Conv -> ReLU -> Flatten -> Gemm (10 logits)."""
    rng = np.random.default_rng(1)
    inits = {"c1": rng.normal(size=(8, 1, 3, 3)).astype(np.float32) / 3, "cb1": rng.normal(size=8).astype(np.float32) / 10,
             "c2": rng.normal(size=(8, 8, 3, 3)).astype(np.float32) / 8, "cb2": rng.normal(size=8).astype(np.float32) / 10,
             "shape": np.array([0, -1], dtype=np.int64),
             "fw": rng.normal(size=(10, 8 * 2 * 2)).astype(np.float32) / 6, "fb": np.zeros(10, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "c1", "cb1"], ["a1"]), helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "c2", "cb2"], ["a2"]), helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("Reshape", ["r2", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, inits, ["n", 1, 10, 10], ["n", 10], "cnn")
    np.savez(tmp_path / "cnn.npz", x=rng.normal(size=(80, 1, 10, 10)).astype(np.float32))
    return path, tmp_path / "cnn.npz"


def matmul_mlp(tmp_path):
    """x [n, 4, 64] @ W1 [64, 128] + b -> Relu -> @ W2 [128, 64]: MatMul weights as torch exports Linear on 3-D inputs."""
    rng = np.random.default_rng(2)
    inits = {"W1": rng.normal(size=(64, 128)).astype(np.float32) / 8, "b1": rng.normal(size=128).astype(np.float32) / 10,
             "W2": rng.normal(size=(128, 64)).astype(np.float32) / 11}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "W2"], ["y"])]
    path = _save(tmp_path, nodes, inits, ["n", 4, 64], ["n", 4, 64], "mm")
    np.savez(tmp_path / "mm.npz", x=rng.normal(size=(48, 4, 64)).astype(np.float32))
    return path, tmp_path / "mm.npz"


def _check_block(block, eval_batch):
    assert block["measured"] is True and block["providers"][0] == "CPUExecutionProvider"
    assert block["runs"] == 3 and block["warmup"] >= 1
    assert [b["batch"] for b in block["batches"]] == [1, eval_batch]
    for b in block["batches"]:
        for which in ("original", "compressed"):
            t = b[which]
            assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        assert b["speedup"] == pytest.approx(b["original"]["median_ms"] / b["compressed"]["median_ms"])
    assert re.fullmatch(r"\d+\.\d\dx (faster|slower) on CPUExecutionProvider, batch 1; \d+\.\d\dx (faster|slower) at batch "
                        + str(eval_batch), block["verdict"])
    for which in ("original", "compressed"):
        census = block["kernels"][which]
        assert sum(census["op_types"].values()) >= 1 and set(census["integer_kernels"]) <= set(census["op_types"])


def test_every_report_has_a_latency_block(tmp_path, caplog):
    model, data = gemm_mlp(tmp_path)
    with caplog.at_level("INFO", logger="fls_compress"):
        rep = compress(model, GPTQConfig(bits=8, activations="int8"), data, output=tmp_path / "q.onnx", options=RUN)
    # 96 samples, 20% held out -> 19 or 20 in the evaluation batch (below EVAL_BATCH = 64)
    eval_batch = rep["verification"]["num_samples"]
    _check_block(rep["latency"], eval_batch)
    assert any(r.getMessage() == f"latency: {rep['latency']['verdict']}" for r in caplog.records)
    assert rep["quantization"]["speed_note"].startswith(rep["latency"]["verdict"])
    assert rep["latency"]["kernels"]["original"]["integer_kernels"] == {}
    json.loads(rep.to_json())  # strict JSON
    pruned = compress(model, MagnitudeConfig(sparsity=0.5), data, options=RUN)
    _check_block(pruned["latency"], eval_batch)
    checked = verify(model, tmp_path / "q.onnx", data, latency_runs=3)
    _check_block(checked["latency"], 64)
    metrics = key_metrics(rep)  # a batch row carries both speed-ups and the verdict
    assert metrics["speedup_batch1"] == rep["latency"]["batches"][0]["speedup"]
    assert metrics["speedup_eval_batch"] == rep["latency"]["batches"][1]["speedup"]


def test_no_latency_and_the_runs_range(tmp_path):
    model, data = gemm_mlp(tmp_path)
    rep = compress(model, RTNConfig(bits=8), data, options=RunOptions(progress=False, latency=False))
    assert rep["latency"] == {"measured": False, "reason": "--no-latency"}
    assert rep["quantization"]["faster"] is None and "not measured" in rep["quantization"]["speed_note"]
    for bad in (0, 10_001):
        with pytest.raises(InvalidOptionError, match="--latency-runs"):
            RunOptions(latency_runs=bad)
    assert verify(model, model, data, latency=False)["latency"]["measured"] is False


def _integer_only(census, layers):
    assert census["float_layer_kernels"] == {}, census["op_types"]
    assert sum(census["integer_kernels"].values()) >= layers, census["op_types"]


def test_w8a8_mlp_runs_as_integer_gemms(tmp_path):
    model, data = gemm_mlp(tmp_path)
    x = np.load(data)["x"]
    q, info = quantize_model(onnx.load(model), {"x": x}, method="rtn", bits=8, activations="int8")
    census = kernel_census(q)
    _integer_only(census, 3)
    assert census["integer_kernels"] == {"QGemm": 3}
    assert info["int32_biases"] == 3.0
    # every Gemm bias is int32 with scale s_x * s_w (zero point 0)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    bias_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].dtype == np.int32]
    assert len(bias_dq) == 3 and all(not inits[n.input[2]].any() for n in bias_dq)
    # outputs stay close to the float model's
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = ort.InferenceSession(q.SerializeToString()).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_w8a8_cnn_runs_as_qlinearconv_and_qgemm(tmp_path):
    model, data = small_cnn(tmp_path)
    x = np.load(data)["x"]
    q, info = quantize_model(onnx.load(model), {"x": x}, method="gptq", bits=8, activations="int8")
    census = kernel_census(q)
    _integer_only(census, 3)
    assert census["integer_kernels"].get("QLinearConv") == 2 and census["integer_kernels"].get("QGemm") == 1
    # the MaxPool / Reshape chains share their producer's grid: 3 ranges (x, r1, r2) for 5 Q/DQ tensors
    assert info["activation_ranges_calibrated"] == 3.0 and info["activation_qdq_tensors"] == 5.0
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    got = ort.InferenceSession(q.SerializeToString()).run(None, {"x": x})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9


def test_w8a8_matmul_and_int4_matmulnbits(tmp_path):
    model, data = matmul_mlp(tmp_path)
    x = np.load(data)["x"]
    proto = onnx.load(model)
    q8, _ = quantize_model(proto, {"x": x}, method="rtn", bits=8, activations="int8")
    census = kernel_census(q8)
    _integer_only(census, 2)
    assert set(census["integer_kernels"]) <= {"MatMulIntegerToFloat", "QLinearMatMul"}
    # 4 bits: MatMulNBits by default (the OBS-compensated codes), DequantizeLinear at opset 21 with matmul_format=qdq
    q4, info4 = quantize_model(proto, {"x": x}, method="gptq", bits=4, granularity="block:32")
    assert [n.op_type for n in q4.graph.node].count("MatMulNBits") == 2 and info4["matmul_nbits_weights"] == "W1, W2"
    assert kernel_census(q4)["integer_kernels"] == {"MatMulNBits": 2}
    # MatMulNBits computes x @ dequantized codes exactly (float accumulation, no accuracy_level given)
    weights, _ = quantize_weights(proto, {"x": x}, method="gptq", bits=4, granularity="block:32")
    deq = {n: q.grid.dequantize(q.codes).T for n, q in weights.items()}  # (out, in) codes -> [in, out]
    expect = np.maximum(x @ deq["W1"] + onnx.numpy_helper.to_array(proto.graph.initializer[1]), 0) @ deq["W2"]
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(q4), expect, rtol=1e-4, atol=1e-4)
    q4d, info4d = quantize_model(proto, {"x": x}, method="gptq", bits=4, granularity="block:32", matmul_format="qdq")
    assert "MatMulNBits" not in {n.op_type for n in q4d.graph.node} and info4d["opset"] == 21.0
    # with --activations int8 the MatMulNBits nodes quantize their inputs per block at run time (accuracy_level 4)
    q4a, info4a = quantize_model(proto, {"x": x}, method="gptq", bits=4, granularity="block:32", activations="int8")
    levels = [a.i for n in q4a.graph.node for a in n.attribute if n.op_type == "MatMulNBits" and a.name == "accuracy_level"]
    assert levels == [4, 4] and info4a["nbits_dynamic_int8_layers"] == 2.0
    with pytest.raises(InvalidOptionError, match="--matmul-format applies to 4-bit"):
        RTNConfig(bits=8, matmul_format="qdq")


# ----------------------------------------------------------------------------- activation ranges
def _identity_layer(tmp_path, n_in):
    """y = x @ W: the calibrated activation is the graph input x itself."""
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "W"], ["y"])],
                 {"W": np.eye(n_in, dtype=np.float32)}, ["n", n_in], ["n", n_in], "id")
    return onnx.load(path)


def test_minmax_and_percentile_ranges_match_closed_forms(tmp_path):
    model = _identity_layer(tmp_path, 8)
    x = np.linspace(-1.0, 3.0, 8 * 4001, dtype=np.float64)[:8 * 4000].astype(np.float32).reshape(-1, 8)
    lo, hi = activation_ranges(model, {"x": x}, ["x"], "minmax")["x"]
    assert (lo, hi) == (float(x.min()), float(x.max()))
    span = float(x.max() - x.min())
    for p in (99.0, 99.9):
        lo, hi = activation_ranges(model, {"x": x}, ["x"], f"percentile:{p}")["x"]
        # uniform on [a, b]: the P-th percentile is a + P/100 (b - a); histogram interpolation is exact to a bin
        assert hi == pytest.approx(x.min() + p / 100 * span, abs=span / BINS)
        assert lo == pytest.approx(x.min() + (1 - p / 100) * span, abs=span / BINS)
    with pytest.raises(InvalidOptionError, match="--act-calibration"):
        activation_ranges(model, {"x": x}, ["x"], "percentile:40")


def _kl_reference(hist, i, levels):
    """KL(P || Q) for threshold bin i, written out group by group (Migacz 2017)."""
    p = [float(v) for v in hist[:i]]
    p[-1] += float(hist[i:].sum())
    q = [0.0] * i
    bounds = [(g * i) // levels for g in range(levels + 1)]
    for g in range(levels):
        a, b = bounds[g], bounds[g + 1]
        nonzero = [j for j in range(a, b) if hist[j] > 0]
        for j in nonzero:
            q[j] = float(hist[a:b].sum()) / len(nonzero)
    ps, qs = sum(p), sum(q)
    return sum((pv / ps) * np.log((pv / ps) / max(qv / qs, 1e-12)) for pv, qv in zip(p, q) if pv > 0)


def test_entropy_threshold_closed_form_and_reference(tmp_path):
    # uniform |x| on [0, 1]: every clipping piles mass into the last bin, so KL is 0 only for the full range
    n = BINS * 20
    x = ((np.arange(n) + 0.5) / n).astype(np.float32).reshape(-1, 8)
    model = _identity_layer(tmp_path, 8)
    lo, hi = activation_ranges(model, {"x": x}, ["x"], "entropy")["x"]
    assert lo == pytest.approx(float(x.min())) and hi == pytest.approx(float(x.max()))
    # a heavy-tailed Laplace sample: the threshold is the argmin of the reference KL over all candidates
    a = np.abs(np.random.default_rng(0).laplace(size=20000))
    hist = np.histogram(a, bins=256, range=(0, a.max()))[0].astype(np.float64)
    levels = 32
    kls = [_kl_reference(hist, i, levels) for i in range(levels, 257)]
    expect = (levels + int(np.argmin(kls))) * a.max() / 256
    assert entropy_threshold(hist, float(a.max()), levels) == pytest.approx(expect)
    assert expect < 0.95 * a.max()  # the tail is clipped


def test_act_calibration_changes_the_ranges_written(tmp_path):
    model, data = gemm_mlp(tmp_path)
    x = np.load(data)["x"]
    scales = {}
    for method in ("minmax", "percentile:99", "entropy"):
        q, info = quantize_model(onnx.load(model), {"x": x}, method="rtn", bits=8, activations="int8",
                                 act_calibration=method)
        assert info["activation_calibration"].startswith(method)
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        scales[method] = float(inits["x_act_scale"])
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert scales["minmax"] == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert scales["percentile:99"] < scales["minmax"]
    with pytest.raises(InvalidOptionError, match="needs --activations int8"):
        RTNConfig(bits=8, act_calibration="entropy")


def test_int4_gemm_weights_become_matmulnbits_with_their_bias(tmp_path):
    model, data = gemm_mlp(tmp_path)
    x = np.load(data)["x"]
    proto = onnx.load(model)
    q4, info = quantize_model(proto, {"x": x}, method="gptq", bits=4, granularity="block:16")
    assert [n.op_type for n in q4.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits", "Relu", "MatMulNBits"]
    assert [n.input[5] for n in q4.graph.node if n.op_type == "MatMulNBits"] == ["b1", "b2", "b3"]
    weights, _ = quantize_weights(proto, {"x": x}, method="gptq", bits=4, granularity="block:16")
    w = {n: q.grid.dequantize(q.codes).astype(np.float64) for n, q in weights.items()}  # (out, in) = Gemm B, transB=1
    b = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer if t.name.startswith("b")}
    h = np.maximum(x @ w["w1"].T + b["b1"], 0)
    h = np.maximum(h @ w["w2"].T + b["b2"], 0)
    expect = h @ w["w3"].T + b["b3"]
    got = ort.InferenceSession(q4.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
    assert kernel_census(q4)["integer_kernels"] == {"MatMulNBits": 3}
