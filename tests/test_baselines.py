"""Numerical tests of the baseline pruners: oBERT/WoodFisher, iEF surgeon, M-FAC, SparseGPT, Wanda.

Real torch / onnxruntime on tiny models; every check compares numbers against an independent dense
computation (inverse, closed form, numpy forward pass).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress.bridge.convert import convert_to_torch
from fls_compress.bridge.weights import PrunableWeight
from fls_compress.curvature.empirical_fisher import BlockFisherEstimator, ief_vectors
from fls_compress.curvature.likelihoods import CategoricalLikelihood
from fls_compress.curvature.mfac import MFACEstimator
from fls_compress.curvature.problem import FisherProblem
from fls_compress.errors import InvalidOptionError
from fls_compress.io.onnx_model import write_back
from fls_compress.pruning.base import SparsitySpec
from fls_compress.io.activations import capture_layer_inputs, conv_groups, layer_sites, to_matrix
from fls_compress.io.layer_rows import layer_input_rows
from fls_compress.pruning.selection import nm_dense_layers, select_n_of_m
from fls_compress.pruning.sparsegpt import SparseGPTPruner, sparsegpt_prune_matrix
from fls_compress.pruning.wanda import WandaPruner, wanda_prune_matrix
from fls_compress.configs import (
    IEFConfig, MagnitudeConfig, MFACConfig, OBertConfig, RunOptions, SparseGPTConfig, WandaConfig, config_types,
)
from fls_compress.pruning.registry import make_pruner


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: intra-op threading only adds contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------
# Tiny MLP problem
# ------------------------------------------------------------------------------------------------
def mlp_problem(sizes=(6, 5, 4), n: int = 48, labels: bool = True, seed: int = 0) -> FisherProblem:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b).double() for a, b in zip(sizes[:-1], sizes[1:])]
    for lin in layers:
        lin.bias.requires_grad_(False)

    def forward(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        h = inputs["x"]
        for i, lin in enumerate(layers):
            h = lin(h)
            if i < len(layers) - 1:
                h = torch.tanh(h)
        return [h]

    weights = {
        f"w{i}": PrunableWeight(f"w{i}", "Gemm", lin.weight, tuple(lin.weight.shape)) for i, lin in enumerate(layers)
    }
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, sizes[0]))
    y = rng.integers(0, sizes[-1], n) if labels else None
    return FisherProblem(forward, weights, {"x": x}, CategoricalLikelihood(), labels=y, batch_size=16)


def dense_vectors(problem: FisherProblem, m: int, ief: bool = False) -> list[torch.Tensor]:
    """Per-example vectors (row-major matrix views concatenated), computed independently of the estimators."""
    out = []
    for batch in problem.iter_batches(m):
        for i, grads in enumerate(problem.per_example_gradients(batch, labels="true")):
            flat = torch.cat([problem.weights[n].to_matrix(grads[n]).reshape(-1) for n in problem.names]).double()
            if ief:
                logits = problem.output(type(batch)({"x": batch.inputs["x"][i : i + 1]})).detach()[0]
                r = torch.softmax(logits, -1)
                r[int(batch.labels[i])] -= 1.0  # r = p - e_y for softmax cross-entropy
                flat = flat / r.norm()
            out.append(flat)
    return out


def layer_slices(problem: FisherProblem) -> dict[str, slice]:
    out, off = {}, 0
    for n, w in problem.weights.items():
        out[n] = slice(off, off + w.numel)
        off += w.numel
    return out


def dense_block_inverses(g: torch.Tensor, lam: float, size: int, block: int) -> list[torch.Tensor]:
    m = g.shape[0]
    nb = -(-size // block)
    padded = torch.cat([g, torch.zeros(m, nb * block - size, dtype=g.dtype)], 1)
    out = []
    for b in range(nb):
        gb = padded[:, b * block : (b + 1) * block]
        out.append(torch.linalg.inv(lam * torch.eye(block, dtype=g.dtype) + gb.T @ gb / m))
    return out


# ------------------------------------------------------------------------------------------------
# oBERT / WoodFisher block inverse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,dtype", [(1, torch.float64), (7, torch.float64), (32, torch.float32)])
def test_obert_blocks_equal_dense_inverse(chunk: int, dtype: torch.dtype) -> None:
    prob = mlp_problem()
    m, block = 30, 7  # 7 does not divide 30 or 20: padded last blocks; 7 does not divide m = 30: a partial chunk
    est = BlockFisherEstimator(m, block, relative_damping=0.05, chunk_size=chunk, dtype=dtype)
    stats = est.fit(prob)
    g = torch.stack(dense_vectors(prob, m))
    alive = sum(int(mk.sum()) for mk in prob.masks.values())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert est.gamma == pytest.approx(0.05 * float((g**2).sum()) / (m * alive), rel=tol)
    assert stats.extra["jittered_blocks"] == 0.0
    for n, sl in layer_slices(prob).items():
        dense = dense_block_inverses(g[:, sl], est.gamma, sl.stop - sl.start, block)
        got = est.block_matrices(n)
        assert got.dtype == dtype
        for b, inv in enumerate(dense):
            assert rel(got[b].double(), inv) < tol
        # diag and matvec through the parameter-shaped interface
        w = prob.weights[n]
        full = torch.block_diag(*dense)[: w.numel, : w.numel]
        assert rel(w.to_matrix(est.diag(n)).reshape(-1), full.diagonal()) < tol
        z = torch.randn(w.parameter.shape, dtype=torch.float64)
        assert rel(w.to_matrix(est.matvec(n, z)).reshape(-1), full @ w.to_matrix(z).reshape(-1)) < tol


def test_obert_inverse_of_ill_conditioned_float32_blocks() -> None:
    """Blocks whose Gram exceeds gamma by ~1e10 (outlier features of a pretrained transformer): the
    inverse is formed in float64 from the float32 Gram; a Gram that rounding made indefinite at that
    damping gets a jitter, counted."""
    torch.manual_seed(0)
    m, B = 16, 6
    g = torch.randn(3, m, B, dtype=torch.float64)
    g[1, :, 0] *= 1e5  # one outlier coordinate: block 1's largest eigenvalue ~1e10 x gamma
    gram64 = g.transpose(1, 2) @ g
    gamma = 1.0
    gram = gram64.float()
    assert BlockFisherEstimator._invert_in_place(gram, m, gamma) == 0
    expect = torch.linalg.inv(gamma * torch.eye(B, dtype=torch.float64) + gram64 / m)
    for b in range(3):  # the small-eigenvalue directions (what OBS uses) are kept to float32 accuracy
        assert rel(gram[b].double(), expect[b]) < 1e-5
    # a rank-1 Gram whose float32 rounding is indefinite below 1e-9 of its scale, damped at 1e-12 of it
    v = torch.tensor([[1.0, 1.0 / 3.0, 2.0 / 7.0, -5.0 / 11.0]], dtype=torch.float64) * 1e6
    bad = (v.T @ v).float().unsqueeze(0)
    assert float(torch.linalg.eigvalsh(bad.double()).min()) < -1.0  # rounding beats the damping of 1
    assert BlockFisherEstimator._invert_in_place(bad, 1, 1.0) == 1
    eig = torch.linalg.eigvalsh(bad[0].double())  # positive definite up to the float32 rounding of its entries
    assert bool(torch.isfinite(bad).all()) and float(eig.min()) > -1e-6 * float(eig.max())


def test_obert_absolute_damping_and_masked_coordinates() -> None:
    prob = mlp_problem()
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = False
    prob.masks["w0"] = mask
    prob.apply_masks()
    est = BlockFisherEstimator(20, 10, damping=0.3, chunk_size=4)
    est.fit(prob)
    assert est.gamma == 0.3
    g = torch.stack(dense_vectors(prob, 20))
    g[:, :30] *= mask.reshape(-1).double()  # pruned coordinates excluded
    for n, sl in layer_slices(prob).items():
        for b, inv in enumerate(dense_block_inverses(g[:, sl], 0.3, sl.stop - sl.start, 10)):
            assert rel(est.block_matrices(n)[b], inv) < 1e-4
    # a pruned coordinate is decoupled: its row of F^-1 is e / lambda
    q = est.block_matrices("w0")[0]  # coordinate 1*6+2 = 8 lies in block 0
    expect = torch.zeros(10, dtype=torch.float64)
    expect[8] = 1 / 0.3
    assert torch.allclose(q[8], expect, atol=1e-12)


def test_block_exact_update_closed_form() -> None:
    prob = mlp_problem()
    est = BlockFisherEstimator(30, 8, relative_damping=0.1)
    est.fit(prob)
    name = "w0"
    w = prob.weights[name]
    theta = w.parameter.detach().clone()
    prune = torch.zeros(5, 6, dtype=torch.bool)
    prune[0, 1] = prune[0, 5] = prune[1, 0] = True  # flat 1, 5, 6: two in block 0, one in block 0 too (6 < 8)
    prune[2, 4] = prune[4, 5] = True  # flat 16 (block 2), 29 (block 3)
    delta = est.block_exact_update(name, theta, prune)
    # closed form per block from the dense block inverses
    flat_t = w.to_matrix(theta).reshape(-1)
    flat_p = w.to_matrix(prune).reshape(-1)
    expect = torch.zeros(30, dtype=torch.float64)
    for b in range(4):
        lo, hi = 8 * b, min(8 * b + 8, 30)
        q = est.block_matrices(name)[b][: hi - lo, : hi - lo]
        p = torch.nonzero(flat_p[lo:hi]).reshape(-1)
        if len(p):
            expect[lo:hi] = -q[:, p] @ torch.linalg.solve(q[p][:, p], flat_t[lo:hi][p])
    got = w.to_matrix(delta).reshape(-1)
    assert rel(got, expect) < 1e-6
    assert torch.allclose(got[flat_p], -flat_t[flat_p], atol=1e-9)  # pruned weights land on zero


# ------------------------------------------------------------------------------------------------
# iEF
# ------------------------------------------------------------------------------------------------
def test_ief_vectors_and_inverse_match_definition() -> None:
    prob = mlp_problem()
    m = 24
    expect = dense_vectors(prob, m, ief=True)
    got = []
    for batch in prob.iter_batches(m):
        for vec, sq in ief_vectors(prob, batch):
            got.append(torch.cat([prob.weights[n].to_matrix(vec[n]).reshape(-1) for n in prob.names]).double())
            assert sq > 0
    assert len(got) == m
    for a, b in zip(got, expect):
        assert rel(a, b) < 1e-10
    est = BlockFisherEstimator(m, 50, relative_damping=0.01, ief=True)
    assert est.name == "ief"
    est.fit(prob)
    g = torch.stack(expect)
    for n, sl in layer_slices(prob).items():
        (inv,) = dense_block_inverses(g[:, sl], est.gamma, sl.stop - sl.start, 50)
        assert rel(est.block_matrices(n)[0], inv) < 1e-4


def test_sampled_label_fallback_warns(caplog: pytest.LogCaptureFixture) -> None:
    prob = mlp_problem(labels=False)
    with caplog.at_level(logging.WARNING):
        BlockFisherEstimator(8, 10).fit(prob)
        MFACEstimator(8).fit(prob)
    assert sum("no labels" in r.message for r in caplog.records) == 2


# ------------------------------------------------------------------------------------------------
# M-FAC
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["joint", "layer"])
def test_mfac_equals_dense_inverse(scope: str) -> None:
    prob = mlp_problem()
    m = 20  # m < d = 50: rank-deficient EF, the damping matters
    est = MFACEstimator(m, relative_damping=0.05, scope=scope)
    est.fit(prob)
    g = torch.stack(dense_vectors(prob, m))
    sl = layer_slices(prob)
    if scope == "joint":
        inv = torch.linalg.inv(est.gamma * torch.eye(50, dtype=torch.float64) + g.T @ g / m)
        blocks = {n: inv[s, s] for n, s in sl.items()}
    else:
        blocks = {n: torch.linalg.inv(est.gamma * torch.eye(s.stop - s.start, dtype=torch.float64) + g[:, s].T @ g[:, s] / m)
                  for n, s in sl.items()}
    z = {n: torch.randn(w.parameter.shape, dtype=torch.float64) for n, w in prob.weights.items()}
    for n, w in prob.weights.items():
        assert rel(w.to_matrix(est.diag(n)).reshape(-1), blocks[n].diagonal()) < 1e-4
        assert rel(w.to_matrix(est.matvec(n, z[n])).reshape(-1), blocks[n] @ w.to_matrix(z[n]).reshape(-1)) < 1e-4
    if scope == "joint":
        zz = torch.cat([prob.weights[n].to_matrix(z[n]).reshape(-1) for n in prob.names])
        out = est.matvec_joint(z)
        got = torch.cat([prob.weights[n].to_matrix(out[n]).reshape(-1) for n in prob.names])
        assert rel(got, inv @ zz) < 1e-4
        # the literal static recursion (Frantar et al. 2021, eq. 5)
        v_ref, c_ref = [], []
        for i in range(m):
            v = g[i] / est.gamma
            for vj, cj in zip(v_ref, c_ref):
                v = v - (vj @ g[i]) / cj * vj
            v_ref.append(v)
            c_ref.append(m + g[i] @ v)
        v_got, c_got = est.vectors()
        perm = torch.cat([torch.arange(s.start, s.stop) for s in sl.values()])  # row-major == flatten for Linear
        assert rel(c_got, torch.stack(c_ref)) < 1e-8
        assert rel(v_got[:, perm], torch.stack(v_ref)) < 1e-8


def test_mfac_memory_cap_reduces_m(caplog: pytest.LogCaptureFixture) -> None:
    prob = mlp_problem()
    est = MFACEstimator(40, max_stored_floats=50 * 10)
    with caplog.at_level(logging.WARNING):
        est.fit(prob)
    assert est.m == 10
    assert any("memory budget" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# SparseGPT / Wanda on one layer
# ------------------------------------------------------------------------------------------------
def _layer_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(64, dtype=torch.float64) + 0.5 * torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) @ mix * torch.linspace(0.2, 3.0, 64, dtype=torch.float64)
    w = torch.randn(16, 64, generator=g, dtype=torch.float64)
    return w, x


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_and_magnitude(nm: tuple[int, int] | None) -> None:
    w, x = _layer_data()
    h = 2 * x.T @ x / x.shape[0]
    k = 16 * 64 // 2
    w_sg, keep_sg = sparsegpt_prune_matrix(w, h, prune_count=k, nm=nm)  # default lazy block 128
    w_wa, keep_wa = wanda_prune_matrix(w, (x**2).sum(0), prune_count=k, nm=nm)
    if nm is None:
        thr = w.abs().reshape(-1).kthvalue(k).values
        w_mg = w * (w.abs() > thr)
    else:
        idx = w.abs().reshape(16, 16, 4).topk(2, dim=-1, largest=False).indices
        w_mg = (w.reshape(16, 16, 4).scatter(-1, idx, 0.0)).reshape(16, 64)

    def err(wp: torch.Tensor) -> float:
        return float(((w - wp) @ x.T).norm())

    assert err(w_sg) < 0.95 * err(w_wa)
    assert err(w_sg) < 0.95 * err(w_mg)
    # small lazy blocks: adaptive per-block quotas, still exact in total
    w_sb, keep_sb = sparsegpt_prune_matrix(w, h, prune_count=k, nm=nm, block_size=16)
    for wp, keep in ((w_sg, keep_sg), (w_wa, keep_wa), (w_sb, keep_sb)):
        assert int((~keep).sum()) == k and int((wp == 0).sum()) == k
        assert torch.all(wp[~keep] == 0)
        if nm is not None:
            assert torch.all((~keep).reshape(16, 16, 4).sum(-1) == 2)
    if nm is None:
        assert torch.all((~keep_wa).sum(1) == 32)  # Wanda: per output row


def test_sparsegpt_lazy_blocks_are_exact() -> None:
    """With a fixed (N:M) mask rule the lazy-batch sweep must not depend on the block size."""
    w, x = _layer_data(1)
    h = 2 * x.T @ x / x.shape[0]
    a, ka = sparsegpt_prune_matrix(w, h, nm=(2, 4), block_size=4)
    b, kb = sparsegpt_prune_matrix(w, h, nm=(2, 4), block_size=128)
    assert torch.equal(ka, kb)
    assert rel(a, b) < 1e-10
    # and one column of the sweep equals explicit OBS with elimination (OBC, Frantar & Alistarh 2022, eq. 3)
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    row = w[0].clone()
    for j in range(64):
        if not ka[0, j]:
            row = row - row[j] / hinv[j, j] * hinv[:, j]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # eliminate column j (fixed order)
        hinv[j, :] = 0
        hinv[:, j] = 0
    assert rel(row, a[0]) < 1e-8


# ------------------------------------------------------------------------------------------------
# ONNX capture and graph-level pruning
# ------------------------------------------------------------------------------------------------
RNG = np.random.default_rng(0)


def conv_model(n_out: int = 4, same_upper: bool = True, seed: int = 0) -> onnx.ModelProto:
    """x[N,4,6,6] -Conv(3x3,pad 1)-Relu-Conv(group 2, stride 2, SAME_UPPER)-Relu-Flatten-Gemm(transB=0)-Relu-MatMul.

    ``same_upper=False`` writes conv2's padding as the equivalent explicit pads (onnx2torch cannot
    convert strided SAME padding).
    """
    pad2 = {"auto_pad": "SAME_UPPER"} if same_upper else {"pads": [0, 0, 1, 1]}
    rng = np.random.default_rng(seed)  # own generator: the weights do not depend on test order
    inits = {
        "W1": rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3,
        "B1": rng.standard_normal(6).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "W3": rng.standard_normal((72, 8)).astype(np.float32) * 0.2,
        "B3": rng.standard_normal(8).astype(np.float32) * 0.1,
        "W4": rng.standard_normal((8, n_out)).astype(np.float32) * 0.5,
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", group=2, strides=[2, 2], **pad2),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "W3", "B3"], ["g"], name="fc", transB=0),
        helper.make_node("Relu", ["g"], ["r3"]),
        helper.make_node("MatMul", ["r3", "W4"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def np_conv(x: np.ndarray, w: np.ndarray, stride: int, pads: tuple[int, int, int, int], group: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, hh, ww = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (hh - kh) // stride + 1, (ww - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    og = o // group
    for g in range(group):
        xs = x[:, g * cg : (g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                patch = xs[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
                out[:, g * og : (g + 1) * og, i, j] = np.einsum("ncij,ocij->no", patch, w[g * og : (g + 1) * og])
    return out


def np_forward(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    c1 = np_conv(x.astype(np.float64), t["W1"], 1, (1, 1, 1, 1), 1) + t["B1"][None, :, None, None]
    r1 = np.maximum(c1, 0)
    c2 = np_conv(r1, t["W2"], 2, (0, 0, 1, 1), 2)  # SAME_UPPER, stride 2 on 6: total pad 1, at the end
    r2 = np.maximum(c2, 0)
    f = r2.reshape(len(x), -1)
    g = f @ t["W3"] + t["B3"]
    r3 = np.maximum(g, 0)
    return {"x": x, "r1": r1, "c2": c2, "f": f, "r3": r3, "y": r3 @ t["W4"]}


def test_capture_layer_inputs_equals_numpy() -> None:
    model = conv_model()
    x = RNG.standard_normal((10, 4, 6, 6)).astype(np.float32)
    ref = np_forward(model, x)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref["y"], rtol=1e-4, atol=1e-4)
    acts = capture_layer_inputs(model, {"x": x}, ["W1", "W2", "W3", "W4"], chunk=3)  # chunked run
    for name, key in (("W1", "x"), ("W2", "r1"), ("W3", "f"), ("W4", "r3")):
        np.testing.assert_allclose(acts[name], ref[key], rtol=1e-4, atol=1e-5)
    # the layer-input rows reproduce each layer's pre-activation: rows @ W_matrix^T
    sites, uses = layer_sites(model)
    t = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    for name, out_key in (("W2", "c2"), ("W3", None), ("W4", "y")):
        site, use = sites[name], uses[name][0]
        x_rows = torch.cat(list(layer_input_rows(site, use, acts[name])), dim=1).double()  # (g, rows, k)
        wm = torch.from_numpy(to_matrix(site, use, t[name]))
        g = conv_groups(site, use)
        og = wm.shape[0] // g
        outs = torch.cat([x_rows[i] @ wm[i * og : (i + 1) * og].T for i in range(g)], dim=1)
        if name == "W3":
            expect = ref["f"] @ t["W3"]
        elif name == "W2":
            expect = ref["c2"].transpose(0, 2, 3, 1).reshape(-1, 8)
        else:
            expect = ref[out_key]
        np.testing.assert_allclose(outs.numpy(), expect, rtol=1e-4, atol=1e-4)
    x1 = torch.cat(list(layer_input_rows(sites["W1"], uses["W1"][0], acts["W1"])), dim=1)[0].double()
    expect1 = ref["r1"]  # conv1 pre-activation (with bias) -> compare before Relu via rows @ W^T + b
    pre = (x1 @ torch.from_numpy(t["W1"].reshape(6, -1)).T + torch.from_numpy(t["B1"])).numpy()
    np.testing.assert_allclose(np.maximum(pre, 0), expect1.transpose(0, 2, 3, 1).reshape(-1, 6), rtol=1e-4, atol=1e-4)


PRUNERS = {"sparsegpt": SparseGPTPruner, "wanda": WandaPruner}


def prune_arrays(model, feeds, spec, method="sparsegpt", **options):
    return PRUNERS[method](model, **options).prune_arrays(feeds, spec)


def nm_groups_onnx(site, use, arr: np.ndarray, m: int) -> np.ndarray | None:
    """The N:M groups of an ONNX weight array, (..., M): Conv over input channels at each (o, kh, kw),
    Gemm/MatMul over the reduction axis. ``None`` when the axis is not a multiple of M."""
    if site.op_type == "Conv":
        if arr.shape[1] % m:
            return None
        moved = np.moveaxis(arr, 1, -1)  # (O, kh, kw, C)
        return moved.reshape(*moved.shape[:-1], arr.shape[1] // m, m)
    mat = to_matrix(site, use, arr)
    return None if mat.shape[1] % m else mat.reshape(mat.shape[0], -1, m)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("sequential", [True, False])
def test_prune_arrays_exact_sparsity_and_pattern(method: str, sequential: bool, caplog) -> None:
    model = conv_model()
    x = RNG.standard_normal((24, 4, 6, 6)).astype(np.float32)
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer if i.name.startswith("W")}
    pruner = PRUNERS[method](model, sequential=sequential)
    arrays = pruner.prune_arrays({"x": x, "labels": np.zeros(24)}, SparsitySpec(0.6))
    assert pruner.last_info["scope"].startswith("not used") and pruner.last_info["steps"].startswith("not used")
    assert set(arrays) == set(sizes)
    zeros = sum(int((a == 0).sum()) for a in arrays.values())
    assert zeros == round(0.6 * sum(sizes.values()))
    for n, a in arrays.items():
        assert abs(float((a == 0).mean()) - 0.6) <= 1.0 / sizes[n] + 1e-12
        assert a.dtype == np.float32
    pruned = write_back(model, arrays)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(None, {"x": x})[0]).all()
    # 2:4: Conv groups over input channels (W1: C=4 groups; W2: 3 channels per group -> dense)
    with caplog.at_level(logging.WARNING):
        arrays, masks = pruner.prune_arrays_and_masks({"x": x}, SparsitySpec(pattern="2:4"))
    assert pruner.last_info["nm_dense_layers"] == "W2"
    assert any("W2" in r.message and "dense" in r.message for r in caplog.records)
    sites, uses = layer_sites(model)
    checked = 0
    for n, arr in arrays.items():
        groups = nm_groups_onnx(sites[n], uses[n][0], arr, 4)
        if groups is None:
            assert masks[n].all() and n == "W2"
            continue
        assert ((groups == 0).sum(-1) >= 2).all(), n  # every group of the ONNX array has >= N zeros
        assert ((~nm_groups_onnx(sites[n], uses[n][0], masks[n], 4)).sum(-1) == 2).all(), n
        assert (arr[~masks[n]] == 0).all()
        checked += 1
    assert checked == 3


def test_sequential_sparsegpt_reconstructs_better_than_one_pass_wanda() -> None:
    model = conv_model()
    x = np.random.default_rng(5).standard_normal((64, 4, 6, 6)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]

    def out_err(arrays: dict[str, np.ndarray]) -> float:
        s = ort.InferenceSession(write_back(model, arrays).SerializeToString(), providers=["CPUExecutionProvider"])
        return float(np.linalg.norm(s.run(None, {"x": x})[0] - y))

    spec = SparsitySpec(0.5)
    e_sg = out_err(prune_arrays(model, {"x": x}, spec, method="sparsegpt"))  # sequential by default
    e_wa = out_err(prune_arrays(model, {"x": x}, spec, method="wanda", sequential=False))
    assert e_sg < e_wa


# ------------------------------------------------------------------------------------------------
# Registry and every method on a converted ONNX model
# ------------------------------------------------------------------------------------------------
def onnx_problem(model: onnx.ModelProto, n: int = 32) -> FisherProblem:
    bridge = convert_to_torch(model)
    x = RNG.standard_normal((n, 4, 6, 6)).astype(np.float32)
    y = RNG.integers(0, 4, n)
    return FisherProblem(bridge.forward, bridge.weights, {"x": x}, CategoricalLikelihood(), labels=y, batch_size=16)


def test_registry_keys_and_binding() -> None:
    names = config_types("prune")
    for key in ("obert", "ief", "mfac", "sparsegpt", "wanda", "magnitude", "fls"):
        assert key in names
    sg = make_pruner(SparseGPTConfig())
    assert getattr(sg, "needs_onnx_model", False)
    with pytest.raises(InvalidOptionError):
        sg.prune(mlp_problem(), SparsitySpec(0.5))
    assert not getattr(make_pruner(OBertConfig()), "needs_onnx_model", False)


RUN32 = RunOptions(num_calibration=32)
BASELINES = {
    "obert": OBertConfig(num_grads=16, block_size=12),
    "ief": IEFConfig(num_grads=16, block_size=12),
    "mfac": MFACConfig(num_grads=16),
    "sparsegpt": SparseGPTConfig(),
    "wanda": WandaConfig(),
    "magnitude": MagnitudeConfig(),
    "magnitude-layer": MagnitudeConfig(scope="layer"),
}


@pytest.mark.parametrize("method", list(BASELINES))
def test_every_method_reaches_exact_sparsity_and_2_4(method: str) -> None:
    model = conv_model(same_upper=False)
    config = BASELINES[method]
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.name.startswith("W"))
    scope = "layer" if method == "magnitude-layer" else "global"
    for spec in (SparsitySpec(0.7, scope=scope, steps=2), SparsitySpec(pattern="2:4")):
        prob = onnx_problem(model)
        pruner = make_pruner(config, RUN32)
        if getattr(pruner, "needs_onnx_model", False):
            pruner.bind(model)
        pruner.prune(prob, spec)
        for n, w in prob.weights.items():  # masks and values agree
            assert torch.all(w.parameter.detach()[~prob.masks[n]] == 0)
        if spec.nm is None:
            pruned = sum(int((~m).sum()) for m in prob.masks.values())
            if method == "magnitude-layer":  # every layer rounds its own count up
                assert 0 <= pruned - round(0.7 * total) <= len(prob.masks)
            else:
                assert pruned == round(0.7 * total)
            if method in ("sparsegpt", "wanda", "magnitude-layer"):
                for m in prob.masks.values():
                    assert abs(float((~m).double().mean()) - 0.7) <= 1.0 / m.numel() + 1e-12
        else:
            sites, uses = layer_sites(model)
            for n, w in prob.weights.items():
                groups = nm_groups_onnx(sites[n], uses[n][0], ~(w.to_onnx(prob.masks[n].double()) != 0), 4)
                if groups is not None:  # conv2 has 3 input channels per group: dense
                    assert np.all(groups.sum(-1) == 2), n
                    assert np.all((nm_groups_onnx(sites[n], uses[n][0], w.to_onnx(), 4) == 0).sum(-1) >= 2), n


def test_layerwise_pruner_matches_prune_arrays() -> None:
    model = conv_model(same_upper=False)
    prob = onnx_problem(model)
    pruner = make_pruner(SparseGPTConfig(), RUN32).bind(model)
    spec = SparsitySpec(0.5)
    expect = pruner.prune_arrays({"x": prob.inputs["x"]}, spec)
    pruner.prune(prob, spec)
    for n, w in prob.weights.items():
        np.testing.assert_allclose(w.to_onnx(), expect[n], rtol=1e-5, atol=1e-6)


def test_obs_pruner_with_obert_prunes_with_less_loss_increase_than_magnitude() -> None:
    """Sanity of the whole OBS path on the MLP: the exact block update keeps the loss closer."""
    losses = {}
    configs = {"obert": OBertConfig(num_grads=64, block_size=8, relative_damping=1e-3), "magnitude": MagnitudeConfig()}
    for method, config in configs.items():
        prob = mlp_problem(sizes=(8, 8, 4), n=64)
        batch = prob.batch_from_indices(np.arange(64))
        pruner = make_pruner(config)
        pruner.prune(prob, SparsitySpec(0.5, steps=2))
        with torch.no_grad():
            losses[method] = float(prob.loss(batch, labels="true"))
    assert losses["obert"] < losses["magnitude"]


def test_select_n_of_m_groups_conv_input_channels_at_each_kernel_position(caplog) -> None:
    """TensorRT's 2:4 layout: weight [O, C, kh, kw] -> groups of 4 over C for fixed (o, kh, kw)."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Parameter(torch.randn(3, 8, 2, 2, generator=g, dtype=torch.float64))
    odd = torch.nn.Parameter(torch.randn(3, 6, 2, 2, generator=g, dtype=torch.float64))
    weights = {"c": PrunableWeight("c", "Conv", conv, (3, 8, 2, 2)), "o": PrunableWeight("o", "Conv", odd, (3, 6, 2, 2))}
    scores = {n: w.parameter.detach().abs() for n, w in weights.items()}
    masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    masks["c"][0, 1, 0, 0] = False  # already pruned: counts towards its group's N
    with caplog.at_level(logging.WARNING):
        newly = select_n_of_m(scores, masks, weights, 2, 4)
    assert not newly["o"].any() and any("'o'" in r.message for r in caplog.records)  # C=6: dense
    sel = newly["c"] | ~masks["c"]
    groups = sel.permute(0, 2, 3, 1).reshape(3, 2, 2, 2, 4)  # (o, kh, kw, C/4, 4)
    assert torch.all(groups.sum(-1) == 2)
    s = scores["c"].permute(0, 2, 3, 1).reshape(3, 2, 2, 2, 4)
    live = newly["c"].permute(0, 2, 3, 1).reshape(3, 2, 2, 2, 4)
    chosen_max = torch.where(live, s, torch.full_like(s, -1)).amax(-1)
    kept_min = torch.where(~groups, s, torch.full_like(s, float("inf"))).amin(-1)
    assert torch.all(chosen_max <= kept_min)
    assert nm_dense_layers(weights, 4) == ["o"]
