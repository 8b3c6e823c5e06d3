"""The quantize-cost changes: float32 X^T X within its derived bound, gathered Conv patches equal to
unfold's, the one-factorisation inverse Cholesky, chained wave capture equal to whole-model capture, and
W8A8 activation ranges read off GPTQ's capture equal to a separate calibration pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from fls_compress.io.activations import ActivationSession, LayerUse, layer_sites
from fls_compress.io.layer_rows import GRAM_BLOCK, RowStatistics, _im2col, _padded_2d, _patches_at, layer_input_rows
from fls_compress.io.sites import PrunableSite
from fls_compress.io.wave_capture import ChainedCapture
from fls_compress.pruning.hessian import damped_inverse_cholesky, lower_triangular_inverse

U32 = 2.0**-24


def _gamma(m: int) -> float:
    return m * U32 / (1 - m * U32)


def test_float32_gram_blocks_stay_within_the_derived_bound() -> None:
    """|H32 - H64| <= gamma_m |X|^T |X| elementwise for partial sums of m <= GRAM_BLOCK float32 rows
    (Higham 2002, eq. 3.5), plus the float64 sum of the partials; H is exactly symmetric."""
    rng = np.random.default_rng(0)
    cols, n = 1100, 2 * GRAM_BLOCK + 808  # three partials; 1100 columns: the block-lower product path
    x = (rng.standard_normal((n, cols)) * rng.lognormal(0, 2, cols) + rng.standard_normal(cols)).astype(np.float32)
    st = RowStatistics(1, cols, full=True, max_rows=None)
    st.plan(n)
    for s, e in ((0, 1000), (1000, 5000), (5000, 5001), (5001, n)):  # chunks straddling the partial boundaries
        st.add(torch.from_numpy(x[s:e]).unsqueeze(0))
    x64 = torch.from_numpy(x).double()
    ref = 2 * x64.T @ x64 / n
    got = st.hessian()
    bound = 2 * (_gamma(GRAM_BLOCK) + 8 * 2.0**-53) * (x64.abs().T @ x64.abs()) / n
    err = (got - ref).abs()
    assert bool((err <= bound).all())
    assert torch.equal(got, got.T)
    assert float((err / bound).max()) < 0.05  # in practice far below the worst case
    torch.testing.assert_close(st.sq[0], torch.diagonal(st.h[0]), rtol=0, atol=0)


CONVS = [((6, 4, 3, 3), dict(pads=[1, 2, 0, 1], strides=[2, 1], dilations=[1, 2])),
         ((6, 2, 3, 2), dict(group=2, strides=[1, 2])),
         ((5, 4, 3), dict(pads=[2, 1], strides=[3], dilations=[2])),
         ((4, 1, 3, 3), dict(group=4, auto_pad="SAME_UPPER", strides=[2, 2])),
         ((8, 3, 1, 4), dict())]


@pytest.mark.parametrize("shape,attrs", CONVS)
def test_gathered_patches_equal_unfold_and_give_the_same_hessian(shape, attrs) -> None:
    rng = np.random.default_rng(1)
    node = helper.make_node("Conv", ["x", "W"], ["y"], **attrs)
    site, use = PrunableSite("W", "Conv", ("c",), shape, 1), LayerUse(node, 0, "x", 1)
    g = attrs.get("group", 1)
    x = torch.from_numpy(rng.standard_normal((5, shape[1] * g) + (9, 11)[: len(shape) - 2]).astype(np.float32))
    xp, k, st, d = _padded_2d(site, use, x)
    u = F.unfold(xp, kernel_size=k, dilation=d, stride=st)
    n, ck, length = u.shape
    assert torch.equal(_im2col(site, use, x), u.transpose(1, 2).reshape(n * length, g, ck // g).transpose(0, 1))
    rows = torch.from_numpy(np.sort(rng.choice(n * length, size=n * length // 3, replace=False)))
    assert torch.equal(_patches_at(site, use, x, rows), _im2col(site, use, x)[:, rows])
    ref = torch.cat(list(layer_input_rows(site, use, x.numpy())), dim=1).double()
    cols = ref.shape[2]
    for max_rows in (None, n * length // 3):
        stats = RowStatistics(g, cols, full=True, max_rows=max_rows, seed=3)
        stats.plan(n * length)
        stats.add_activation(site, use, x.numpy())
        keep = slice(None) if max_rows is None else torch.from_numpy(stats._keep)
        r = ref[:, keep]
        for gi in range(g):
            want = 2 * r[gi].T @ r[gi] / r.shape[1]
            bound = 2 * _gamma(r.shape[1]) * (r[gi].abs().T @ r[gi].abs()) / r.shape[1] + 1e-12
            assert bool(((stats.hessian(gi) - want).abs() <= bound).all())
        torch.testing.assert_close(stats.sq, torch.stack([torch.diagonal(stats.hessian(gi)) for gi in range(g)]) * r.shape[1] / 2)


def test_inverse_cholesky_from_one_factorisation_is_the_upper_factor_of_the_damped_inverse() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((300, 120)) * rng.lognormal(0, 1, 120))
    x[:, :3] = 0  # dead inputs keep H_jj = 0 (damping only)
    h = 2 * x.T @ x / 300
    u = damped_inverse_cholesky(h, 0.01)
    damped = h + 0.01 * float(h.diagonal().mean()) * torch.eye(120, dtype=torch.float64)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    torch.testing.assert_close(u.T @ u @ damped, torch.eye(120, dtype=torch.float64), rtol=0, atol=1e-10)
    # the reference construction (GPTQ's code): chol(H) -> H^-1 -> upper chol of H^-1; unique factor
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    torch.testing.assert_close(u, ref, rtol=1e-10, atol=1e-12)


def test_blocked_triangular_inverse_equals_the_triangular_solve() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 256, 257, 701):  # base case, first split, odd splits two levels down
        a = torch.from_numpy(rng.standard_normal((n, n + 5)))
        low = torch.linalg.cholesky(a @ a.T / n + 0.01 * torch.eye(n, dtype=torch.float64))
        inv = lower_triangular_inverse(low)
        assert torch.equal(inv, inv.tril())
        eye = torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(inv, torch.linalg.solve_triangular(low, eye, upper=False), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(low @ inv, eye, rtol=0, atol=1e-9)


def _branchy_model() -> onnx.ModelProto:
    """x -> MatMul W1 -> Relu -> (MatMul W2, skip) -> Add -> MatMul W3; a Constant feeds an Add."""
    rng = np.random.default_rng(4)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in (("W1", (6, 8)), ("W2", (8, 8)), ("W3", (8, 3)))}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full(8, 0.5, np.float32))),
             helper.make_node("Add", ["m", "r"], ["s0"]), helper.make_node("Add", ["s0", "c"], ["s"]),
             helper.make_node("MatMul", ["s", "W3"], ["y"])]
    graph = helper.make_graph(nodes, "b", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_chained_capture_equals_whole_model_capture_and_runs_each_node_once() -> None:
    model = _branchy_model()
    x = np.random.default_rng(5).standard_normal((50, 6)).astype(np.float32)
    _, uses = layer_sites(model)
    current = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    chain = ChainedCapture(model, {"x": x}, chunk=16)
    whole = ActivationSession(model, ["x", "r", "s"], overridable=list(current))
    runs = []
    for name in ("W1", "W2", "W3"):
        current = {**current, name: current[name] * 0.5}  # this wave's weights change before the next capture
        value = uses[name][0].activation
        runs.append(sorted(chain.closure([value])))
        got = np.concatenate([c[value] for c in chain.run([value], current)])
        want = np.concatenate([c[value] for c in whole.iterate({"x": x}, [value], chunk=16, overrides=current)])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    flat = [i for r in runs for i in r]
    assert len(flat) == len(set(flat))  # no node ran twice
    assert set(chain.cache) == {"s"}  # dropped once their readers ran; the last layer's input is still unread
    assert ChainedCapture(model, {"x": x}, chunk=16, budget_bytes=0).run(["s"], current) is None


def test_w8a8_ranges_read_off_the_gptq_capture_equal_a_separate_minmax_pass(tmp_path) -> None:
    from fls_compress.quantize.act_ranges import activation_ranges, uint8_params
    from fls_compress.quantize.model import quantize_model, range_candidates

    from .models import small_cnn

    cnn = small_cnn(tmp_path, epochs=1)  # built here: a fresh clone has no sample_models/*.onnx
    model = onnx.load(cnn["model"])
    calib = {k: v[:96] for k, v in np.load(cnn["calib"]).items() if k != "labels"}
    q, info = quantize_model(model, calib, method="gptq", bits=8, activations="int8", num_samples=96)
    assert info["activation_ranges_from_capture"] == info["activation_ranges_calibrated"] > 0
    assert all(info[f"time_{s}_s"] >= 0 for s in ("capture", "hessian", "transform", "write_qdq", "act_ranges"))
    weights_only, _ = quantize_model(model, calib, method="gptq", bits=8, activations="none", num_samples=96)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    roots = [n[: -len("_act_scale")] for n in inits if n.endswith("_act_scale")]
    candidates = range_candidates(model, None)  # the capture hands back the chains' roots only
    assert set(candidates) <= set(roots) and len(candidates) == info["activation_ranges_calibrated"]
    separate = activation_ranges(weights_only, calib, roots)
    for r in roots:
        scale, zero = uint8_params(*separate[r])
        np.testing.assert_allclose(inits[f"{r}_act_scale"], scale, rtol=1e-6)
        assert abs(int(inits[f"{r}_act_zero_point"]) - int(zero)) <= 1
