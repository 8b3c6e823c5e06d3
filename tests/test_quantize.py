"""Weight quantisation: grids, the OBS quantisation sweep against step-by-step closed forms, GPTQ vs
RTN, joint pruning, and the QDQ ONNX export checked bit for bit in onnxruntime."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress.errors import InvalidOptionError, UnsupportedModelError
from fls_compress.io.activations import from_matrix, layer_sites, to_matrix
from fls_compress.io.onnx_model import write_back
from fls_compress.pruning.sweep import inverse_hessian_cholesky
from fls_compress.quantize import Grid, QuantSpec, quantize_model, quantize_weights
from fls_compress.quantize.gptq import act_order, fls_quantize_matrix, gptq_quantize_matrix, rtn_quantize_matrix
from fls_compress.quantize.qdq import write_qdq

from .test_baselines import conv_model, np_conv

SPECS = [QuantSpec(b, s, g) for b, s, g in itertools.product((4, 8), (True, False), ("tensor", "channel", "block:4"))]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(seed: int = 0, rows: int = 12, cols: int = 32, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols, dtype=torch.float64) + 2.0 * torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.3, 2.0, cols, dtype=torch.float64)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, x, 2 * x.T @ x / n


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-{s.granularity}")
def test_grid_values_are_exactly_on_the_grid(spec: QuantSpec) -> None:
    w = np.random.default_rng(0).standard_normal((6, 16)) * np.linspace(0.1, 3, 16)
    w[0, :4] = 0.0
    grid = Grid.fit(w, spec)
    codes = grid.codes(w)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    q = grid.quantize(w)
    assert q.dtype == np.float32
    assert np.array_equal(grid.dequantize(codes), q)  # bit for bit
    assert np.array_equal(grid.codes(q), codes)  # grid values are fixed points
    s = np.repeat(grid.scale, grid.group_size, axis=1).astype(np.float64)
    z = np.repeat(grid.zero_point, grid.group_size, axis=1)
    assert np.array_equal(q, ((codes - z).astype(np.float32) * s.astype(np.float32)))
    assert np.all(np.abs(q - w) <= s / 2 * (1 + 1e-6))  # nearest point, no clipping inside the fitted range
    assert np.all(q[0, :4] == 0)  # 0 is on every grid
    # the sweep's column quantizer returns the same values
    quant = grid.column_quantizer()
    for j in range(16):
        assert np.array_equal(quant(torch.from_numpy(w[:, j]), j).numpy().astype(np.float32), q[:, j])


def test_grid_options_are_validated() -> None:
    with pytest.raises(InvalidOptionError):
        QuantSpec(bits=3)
    with pytest.raises(InvalidOptionError):
        QuantSpec(granularity="block:0")
    with pytest.raises(InvalidOptionError):
        QuantSpec(granularity="row")
    assert Grid.fit(np.ones((2, 10)), QuantSpec(granularity="block:4")).scale.shape == (2, 3)  # last block shorter


# ------------------------------------------------------------------------------------------------
# The OBS quantisation sweep
# ------------------------------------------------------------------------------------------------
def _sequential_obs(theta: np.ndarray, h: np.ndarray, quant, pruned=None) -> tuple[np.ndarray, float]:
    """Closed form, column by column: fix w_i to its grid point (0 if pruned), re-solve the free columns
    F = {i+1..}: w_F -= (w_i - q_i) / [H_F^-1]_00 * H_F^-1[:, 0] on F = {i..} (OBS, Hassibi & Stork 1993)."""
    w = theta.copy()
    loss = 0.0
    for i in range(len(w)):
        q = 0.0 if pruned is not None and pruned[i] else float(quant(torch.tensor([w[i]]), i)[0])
        hinv = np.linalg.inv(h[i:, i:])
        loss += 0.5 * (w[i] - q) ** 2 / hinv[0, 0]
        w[i:] = w[i:] - (w[i] - q) / hinv[0, 0] * hinv[:, 0]
        w[i] = q
    return w, loss


def test_gptq_sweep_equals_sequential_obs_closed_form_on_1x3() -> None:
    h = np.array([[2.0, 0.9, 0.3], [0.9, 1.5, -0.4], [0.3, -0.4, 1.0]])
    theta = np.array([[0.37, -0.81, 0.55]])
    grid = Grid.fit(theta, QuantSpec(4, True, "channel"))
    res = gptq_quantize_matrix(torch.from_numpy(theta), torch.from_numpy(h), grid, percdamp=0.0)
    ref, loss = _sequential_obs(theta[0], h, grid.column_quantizer())
    np.testing.assert_allclose(res.weight[0].numpy(), ref, rtol=0, atol=1e-12)
    assert float(res.loss[0]) == pytest.approx(loss, rel=1e-10)
    # the loss is the exact quadratic error of the final weights
    d = res.weight[0].numpy() - theta[0]
    assert float(res.loss[0]) == pytest.approx(0.5 * d @ h @ d, rel=1e-10)
    # enumerate every grid point of the row: the greedy sweep is feasible, never below the optimum,
    # and here (the enumeration shows it) it finds the optimum
    spec = grid.spec
    points = (np.arange(spec.qmin, spec.qmax + 1).astype(np.float32) * grid.scale[0, 0]).astype(np.float64)
    best = min(0.5 * (np.array(c) - theta[0]) @ h @ (np.array(c) - theta[0]) for c in itertools.product(points, repeat=3))
    assert np.isin(res.weight[0].numpy(), points).all()
    assert best == pytest.approx(float(res.loss[0]), rel=1e-9)


def test_joint_prune_and_quantize_sweep_matches_closed_form_and_keeps_zeros() -> None:
    w, _, h = _layer(1, rows=3, cols=8)
    grid = Grid.fit(w.numpy(), QuantSpec(8, False, "block:4"))
    alive = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) > 0.4
    res = gptq_quantize_matrix(w, h, grid, percdamp=0.0, alive=alive, block_size=3)
    for r in range(3):
        ref, _ = _sequential_obs(w[r].numpy(), h.numpy(), lambda c, j, r=r: grid.column_quantizer()(
            torch.full((3,), float(c[0]), dtype=torch.float64), j)[r:r + 1], pruned=~alive[r].numpy())
        np.testing.assert_allclose(res.weight[r].numpy(), ref, atol=1e-12)
    assert torch.all(res.weight[~alive] == 0) and torch.equal(res.pruned, ~alive)
    codes = grid.codes(res.weight.numpy())
    assert np.array_equal(grid.dequantize(codes)[~alive.numpy()], np.zeros(int((~alive).sum()), np.float32))


def test_gptq_beats_rtn_on_layer_reconstruction() -> None:
    w, x, h = _layer(2)
    for spec in (QuantSpec(4, True, "channel"), QuantSpec(4, False, "block:8"), QuantSpec(8, True, "tensor")):
        grid = Grid.fit(w.numpy(), spec)
        q_rtn = torch.from_numpy(rtn_quantize_matrix(w.numpy(), grid).astype(np.float64))
        q_gptq = gptq_quantize_matrix(w, h, grid).weight
        q_act = gptq_quantize_matrix(w, h, grid, use_act_order=True).weight

        def err(q: torch.Tensor) -> float:
            return float(((w - q) @ x.T).norm())

        assert err(q_gptq) < 0.9 * err(q_rtn), spec
        assert err(q_act) < 0.8 * err(q_rtn), spec
        assert np.array_equal(grid.quantize(q_gptq.numpy()), q_gptq.numpy().astype(np.float32))


def test_act_order_is_gptq_on_the_permuted_problem() -> None:
    w, _, h = _layer(3, rows=4, cols=16)
    grid = Grid.fit(w.numpy(), QuantSpec(4, True, "channel"))
    perm = act_order(h)
    assert torch.all(h.diagonal()[perm][:-1] >= h.diagonal()[perm][1:])
    a = gptq_quantize_matrix(w, h, grid, use_act_order=True, percdamp=0.0).weight
    b = gptq_quantize_matrix(w[:, perm], h[perm][:, perm], grid, percdamp=0.0).weight[:, torch.argsort(perm)]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # per-channel grid: columns share the scale
    with pytest.raises(InvalidOptionError):
        gptq_quantize_matrix(w, h, grid, use_act_order=True, nm=(2, 4))


def test_fls_hook_is_the_same_sweep_with_supplied_factor_and_row_scale() -> None:
    w, _, h = _layer(4, rows=3, cols=8)
    grid = Grid.fit(w.numpy(), QuantSpec(4, True, "channel"))
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    a = fls_quantize_matrix(w, u, None, grid).weight
    b = gptq_quantize_matrix(w, h, grid, percdamp=0.0).weight
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # row-dependent curvature: row r uses H_r^-1 = D_r U^T U D_r
    scale = torch.rand(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    c = fls_quantize_matrix(w, u, scale, grid).weight
    for r in range(3):
        hr = torch.linalg.inv(torch.diag(scale[r]) @ u.T @ u @ torch.diag(scale[r]))
        ref, _ = _sequential_obs(w[r].numpy(), hr.numpy(), lambda col, j, r=r: grid.column_quantizer()(
            torch.full((3,), float(col[0]), dtype=torch.float64), j)[r:r + 1])
        np.testing.assert_allclose(c[r].numpy(), ref, atol=1e-10)
    # a permuted sweep re-factorises the inverse and still matches the closed form on the permuted problem
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    d = fls_quantize_matrix(w, u, None, grid, col_order=order).weight
    e = gptq_quantize_matrix(w[:, order], h[order][:, order], grid, percdamp=0.0).weight[:, torch.argsort(order)]
    torch.testing.assert_close(d, e, rtol=0, atol=1e-8)
    assert inverse_hessian_cholesky(torch.linalg.inv(h))[1] == 0.0


# ------------------------------------------------------------------------------------------------
# QDQ export
# ------------------------------------------------------------------------------------------------
def layout_model(opset: int = 13) -> onnx.ModelProto:
    """x[N,4,5,5] -Conv-Relu-Flatten-Gemm(transB=0)-Gemm(transB=1)-MatMul(X@W); plus W@X on a side input."""
    rng = np.random.default_rng(7)
    inits = {
        "Wc": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
        "Wg0": rng.standard_normal((72, 16)).astype(np.float32) * 0.2,  # transB=0: [in, out]
        "Wg1": rng.standard_normal((8, 16)).astype(np.float32) * 0.3,  # transB=1: [out, in]
        "Wm": rng.standard_normal((8, 4)).astype(np.float32) * 0.4,  # X @ W: [in, out]
        "Wl": rng.standard_normal((4, 8)).astype(np.float32) * 0.4,  # W @ X: [out, in]
    }
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], pads=[0, 0, 0, 0], strides=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg0"], ["g0"], transB=0),
        helper.make_node("Relu", ["g0"], ["r0"]),
        helper.make_node("Gemm", ["r0", "Wg1"], ["g1"], transB=1),
        helper.make_node("MatMul", ["g1", "Wm"], ["y"]),
        helper.make_node("MatMul", ["Wl", "z"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes, "layouts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [8, "K"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, "K"])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every graph output, plus the named intermediate values, by name."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in outputs or []:
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in m.graph.output]
    return dict(zip(names, sess.run(names, feeds)))


def _feeds(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    return {"x": rng.standard_normal((n, 4, 5, 5)).astype(np.float32), "z": rng.standard_normal((8, 3)).astype(np.float32)}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{'sym' if s.symmetric else 'asym'}-{s.granularity}")
def test_qdq_round_trip_is_bit_exact_in_onnxruntime(spec: QuantSpec) -> None:
    model = layout_model()
    weights, info = quantize_weights(model, None, method="rtn", bits=spec.bits, symmetric=spec.symmetric,
                                     granularity=spec.granularity)
    sites, uses = layer_sites(model)
    qdq, opset = write_qdq(model, weights, sites, uses)
    onnx.checker.check_model(qdq, full_check=True)
    assert opset["opset_raised"] == (spec.bits == 4 or spec.block is not None)
    assert {n.op_type for n in qdq.graph.node} >= {"DequantizeLinear"}
    assert not {t.name for t in qdq.graph.initializer} & set(weights)  # float weights are gone
    feeds = _feeds()
    deq = _run(qdq, feeds, list(weights))
    float_arrays = {}
    for n, q in weights.items():
        expect = from_matrix(sites[n], uses[n][0], q.grid.dequantize(q.codes))
        assert deq[n].dtype == np.float32 and np.array_equal(deq[n], expect), n  # bit for bit
        float_arrays[n] = expect
    # the QDQ model computes what the float model computes with the dequantized weights
    ref = _run(write_back(model, float_arrays), feeds)
    assert set(ref) == {"y", "y2"}
    for k, b in ref.items():
        np.testing.assert_allclose(deq[k], b, rtol=1e-5, atol=1e-5)
    # and what numpy computes with the dequantized weights
    w = {k: v.astype(np.float64) for k, v in float_arrays.items()}
    h = np.maximum(np_conv(feeds["x"].astype(np.float64), w["Wc"], 1, (0, 0, 0, 0), 1), 0).reshape(len(feeds["x"]), -1)
    y = (np.maximum(h @ w["Wg0"], 0) @ w["Wg1"].T) @ w["Wm"]
    np.testing.assert_allclose(deq["y"], y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deq["y2"], w["Wl"] @ feeds["z"], rtol=1e-4, atol=1e-4)


def test_qdq_opset_rules_and_refusals() -> None:
    model = layout_model(opset=13)
    q8, info = quantize_model(model, None, method="rtn", bits=8, granularity="channel")
    assert info["opset_raised"] == "no" and info["opset"] == 13.0
    q4, info = quantize_model(model, None, method="rtn", bits=4, granularity="channel")
    assert info["opset_raised"] == "yes" and info["opset"] == 21.0 and q4.ir_version >= 10
    onnx.checker.check_model(q4, full_check=True)
    with pytest.raises(UnsupportedModelError, match="opset"):
        quantize_model(model, None, method="rtn", bits=4, allow_opset_raise=False)
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        quantize_model(q8, None, method="rtn")
    q5, _ = quantize_model(model, None, method="rtn", granularity="block:5")  # 5 divides no K: shorter last blocks
    onnx.checker.check_model(q5, full_check=True)
    with pytest.raises(InvalidOptionError):
        quantize_model(model, None, method="rtn", act_order=True)
    with pytest.raises(InvalidOptionError):
        quantize_model(model, None, method="fls")  # no curvature given


def test_gptq_model_with_2_4_sparsity_runs_and_keeps_groups() -> None:
    model = conv_model(same_upper=False)
    x = np.random.default_rng(1).standard_normal((48, 4, 6, 6)).astype(np.float32)
    qdq, info = quantize_model(model, {"x": x}, method="gptq", bits=8, pattern="2:4")
    onnx.checker.check_model(qdq, full_check=True)
    assert info["nm_dense_layers"] == "W2"
    sites, uses = layer_sites(model)
    names = [n for n in sites]
    deq = _run(qdq, {"x": x}, names)
    for n in names:
        arr = deq[n]
        if n == "W2":
            continue
        if sites[n].op_type == "Conv":
            groups = np.moveaxis(arr, 1, -1).reshape(arr.shape[0], *arr.shape[2:], -1, 4)
        else:
            mat = to_matrix(sites[n], uses[n][0], arr)
            groups = mat.reshape(mat.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all(), n


def test_int8_per_channel_gptq_keeps_top1_on_the_sample_cnn(tmp_path) -> None:
    from .models import small_cnn

    paths = small_cnn(tmp_path, epochs=1)
    model = onnx.load(str(paths["model"]))
    calib = dict(np.load(paths["calib"]))
    test = np.load(paths["test"])["input"].astype(np.float32)
    name = model.graph.input[0].name
    qdq, info = quantize_model(model, {name: calib["input"].astype(np.float32)}, method="gptq", bits=8,
                               granularity="channel", num_samples=128)
    onnx.checker.check_model(qdq, full_check=True)
    out = model.graph.output[0].name
    ref = _run(model, {name: test})[out].argmax(1)
    got = _run(qdq, {name: test})[out].argmax(1)
    assert float((ref == got).mean()) >= 0.98
    assert info["layers_quantized"] >= 3
    # 4 bits: the OBS compensation keeps clearly more predictions than round-to-nearest
    agree = {}
    for method in ("rtn", "gptq"):
        q4, _ = quantize_model(model, {name: calib["input"].astype(np.float32)}, method=method, bits=4, num_samples=128)
        agree[method] = float((_run(q4, {name: test})[out].argmax(1) == ref).mean())
    assert agree["gptq"] > agree["rtn"] + 0.05
    # static int8 activations on top: still runs and agrees on most of the test set
    qa, info_a = quantize_model(model, {name: calib["input"].astype(np.float32)}, method="gptq", bits=8,
                                activations="int8", num_samples=128)
    onnx.checker.check_model(qa, full_check=True)
    # one range per layer input; the MaxPool/Flatten chains and Conv outputs share them (integer-kernel placement)
    assert info_a["activation_ranges_calibrated"] == info["layers_quantized"]
    got_a = _run(qa, {name: test})[out].argmax(1)
    assert float((ref == got_a).mean()) >= 0.95


def test_activation_qdq_matches_fake_quant_reference() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = (rng.standard_normal((32, 5)) * 2 + 0.5).astype(np.float32)
    qa, info = quantize_model(model, {"x": x}, method="rtn", bits=8, activations="int8")
    assert info["activation_qdq_tensors"] == 1.0
    weights, _ = quantize_weights(model, None, method="rtn", bits=8)
    wq = weights["W"].grid.dequantize(weights["W"].codes)  # (out, in) = the Gemm B with transB=1
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.round(-lo / float(scale)), 0, 255)
    xq = (np.clip(np.round(x / scale) + zero, 0, 255) - zero).astype(np.float32) * scale
    np.testing.assert_allclose(_run(qa, {"x": x})["y"], xq @ wq.T, rtol=1e-5, atol=1e-5)
    assert {n.op_type for n in qa.graph.node} == {"QuantizeLinear", "DequantizeLinear", "Gemm"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_sparse_and_quantized_layers_reach_the_target(method: str) -> None:
    model = conv_model(same_upper=False)
    x = np.random.default_rng(2).standard_normal((32, 4, 6, 6)).astype(np.float32)
    weights, info = quantize_weights(model, {"x": x}, method=method, bits=4, sparsity=0.5)
    total = sum(q.codes.size for q in weights.values())
    zeros = 0
    for n, q in weights.items():
        deq = q.grid.dequantize(q.codes)
        z = int((deq == 0).sum())
        assert z >= 0.5 * q.codes.size - 1, n  # uniform per layer (plus weights that round to 0)
        zeros += z
    assert zeros >= np.ceil(0.5 * total) and info["sparsity"] == pytest.approx(zeros / total)


def test_gptq_on_depthwise_and_1d_convolutions_beats_rtn() -> None:
    """Grouped convolutions get one Hessian per group (im2col per group); 1-D convs are unfolded too."""
    rng = np.random.default_rng(4)
    inits = {"Wd": rng.standard_normal((8, 1, 5)).astype(np.float32), "Wp": rng.standard_normal((6, 8, 1)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wd"], ["d"], group=8, pads=[2, 2]),
         helper.make_node("Conv", ["d", "Wp"], ["y"])], "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 16])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    smooth = np.cumsum(rng.standard_normal((64, 8, 16)), axis=2).astype(np.float32)  # correlated positions
    y = _run(model, {"x": smooth})["y"]
    errs = {}
    for method in ("rtn", "gptq"):
        q, _ = quantize_model(model, {"x": smooth}, method=method, bits=4, granularity="channel")
        errs[method] = float(np.linalg.norm(_run(q, {"x": smooth})["y"] - y))
    assert errs["gptq"] < 0.95 * errs["rtn"]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "block:16"])
def test_int4_matmul_below_opset_21_uses_matmulnbits(symmetric: bool, granularity: str) -> None:
    rng = np.random.default_rng(9)
    w1 = rng.standard_normal((32, 48)).astype(np.float32)  # K = 32: one block of 32 per channel
    w2 = rng.standard_normal((48, 16)).astype(np.float32)  # K = 48: three blocks of 16 (odd: padded zero points)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((10, 32)).astype(np.float32)
    q, info = quantize_model(model, {"x": x}, method="gptq", bits=4, symmetric=symmetric, granularity=granularity,
                             allow_opset_raise=False, matmul_format="qdq")
    assert info["opset"] == 13.0 and info["matmul_nbits"] == 2.0 and "MatMulNBits" in info["fallback"]
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits", "Relu", "MatMulNBits"]
    weights, _ = quantize_weights(model, {"x": x}, method="gptq", bits=4, symmetric=symmetric, granularity=granularity)
    deq = {n: wq.grid.dequantize(wq.codes).astype(np.float64) for n, wq in weights.items()}  # (out, in) views
    expect = np.maximum(x.astype(np.float64) @ deq["W1"].T, 0) @ deq["W2"].T
    np.testing.assert_allclose(_run(q, {"x": x})["y"], expect, rtol=1e-4, atol=1e-4)


def test_quantize_model_fls_takes_u_and_row_scale_per_layer() -> None:
    """The fls hook: with U = chol_upper(H^-1) of each layer's own Hessian it reproduces GPTQ (percdamp 0)."""
    model = layout_model()
    weights, _ = quantize_weights(model, None, method="rtn", bits=4)
    sites, uses = layer_sites(model)
    rng = np.random.default_rng(11)
    curvature, hessians = {}, {}
    for n in weights:
        cols = weights[n].codes.shape[1]
        a = rng.standard_normal((cols, 2 * cols))
        h = torch.from_numpy(a @ a.T / (2 * cols) + 0.1 * np.eye(cols))
        hessians[n] = h
        curvature[n] = (torch.linalg.cholesky(torch.linalg.inv(h), upper=True), torch.ones(weights[n].codes.shape, dtype=torch.float64))
    got, info = quantize_weights(model, None, method="fls", bits=4, curvature=curvature)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n, q in got.items():
        w = torch.from_numpy(to_matrix(sites[n], uses[n][0], arrays[n]).astype(np.float64))
        ref = gptq_quantize_matrix(w, hessians[n], q.grid, percdamp=0.0).weight.numpy().astype(np.float32)
        assert np.array_equal(q.grid.dequantize(q.codes), ref), n
    assert info["obs_loss"] > 0
    bad = dict(curvature)
    bad["Wc"] = (curvature["Wc"][0], torch.ones(3, 3))
    with pytest.raises(InvalidOptionError, match="row_scale"):
        quantize_weights(model, None, method="fls", bits=4, curvature=bad)
