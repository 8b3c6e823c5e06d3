"""End-to-end pruning through the library: ONNX in, verified ONNX out."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fls_compress import FLSConfig, MagnitudeConfig, RunOptions, SparseGPTConfig, compress
from fls_compress.io.onnx_model import prunable_initializers

from .models import small_autoencoder, small_cnn


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    return small_autoencoder(tmp_path_factory.mktemp("ae"))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return small_cnn(tmp_path_factory.mktemp("cnn"))


def _fast_fls(**kw) -> FLSConfig:
    base = dict(fit_steps=30, refit_steps=10, batch_size=32, moment_samples=64)
    base.update(kw)
    return FLSConfig(**base)


QUIET = RunOptions(progress=False)


def _structure(model: onnx.ModelProto):
    g = model.graph
    return (
        [n.SerializeToString() for n in g.node],
        [i.SerializeToString() for i in g.input],
        [o.SerializeToString() for o in g.output],
        [(o.domain, o.version) for o in model.opset_import],
        [(p.key, p.value) for p in model.metadata_props],
        model.ir_version,
        sorted(t.name for t in g.initializer),
    )


def test_fls_prune_writes_back_into_the_original_graph(ae, tmp_path):
    src = ae["model"]
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "pruned.onnx"
    report = compress(
        src, _fast_fls(sparsity=0.9), ae["calib"], output=out, eval_data=ae["test"], report=tmp_path / "r.json",
        options=RunOptions(num_calibration=256, progress=False),
    )
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before  # input untouched
    original, pruned = onnx.load(src), onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert _structure(original) == _structure(pruned)
    names = [s.name for s in prunable_initializers(original)]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    zeros = sum(int((inits[n] == 0).sum()) for n in names)
    total = sum(inits[n].size for n in names)
    assert zeros / total >= 0.9 - 1e-6
    assert report["sparsity"]["achieved"] == pytest.approx(zeros / total)
    # biases are never pruned
    for t in original.graph.initializer:
        if t.name not in names:
            np.testing.assert_array_equal(inits[t.name], onnx.numpy_helper.to_array(t))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(ae["test"])["input"][:4]
    assert np.isfinite(sess.run(None, {"input": x})[0]).all()
    assert (tmp_path / "r.json").exists()
    assert report["likelihood"] == "bernoulli"
    assert report["verification"]["num_samples"] == 500


@pytest.mark.slow
def test_fls_beats_global_magnitude_on_the_autoencoder(ae, tmp_path):
    """The FLS headline claim, at small scale: lower test reconstruction loss at every sparsity."""
    losses = {}
    for method in ("magnitude", "fls"):
        for s in (0.5, 0.7, 0.8, 0.9):
            config = _fast_fls(sparsity=s) if method == "fls" else MagnitudeConfig(sparsity=s)
            rep = compress(ae["model"], config, ae["calib"], output=tmp_path / f"{method}{s}.onnx", eval_data=ae["test"],
                           options=RunOptions(num_calibration=256, progress=False))
            losses[method, s] = rep["verification"]["outputs"]["logits"]["bernoulli_nll_compressed"]
    for s in (0.5, 0.7, 0.8, 0.9):
        assert losses["fls", s] < losses["magnitude", s], (s, losses)


def test_classifier_prune_with_labels_reports_accuracy_and_is_deterministic(cnn, tmp_path):
    config, opts = _fast_fls(sparsity=0.7, fit_steps=10, refit_steps=5), RunOptions(num_calibration=128, seed=3, progress=False)
    r1 = compress(cnn["model"], config, cnn["calib"], output=tmp_path / "a.onnx", eval_data=cnn["test"], options=opts)
    r2 = compress(cnn["model"], config, cnn["calib"], output=tmp_path / "b.onnx", eval_data=cnn["test"], options=opts)
    assert r1["likelihood"] == "categorical"
    assert r2["sparsity"] == r1["sparsity"]
    out = r1["verification"]["outputs"]["logits"]
    assert out["accuracy_original"] > 0.8
    assert out["top1_agreement"] > 0.8
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "a.onnx").graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "b.onnx").graph.initializer}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_sparse_storage_is_smaller_and_equivalent(ae, tmp_path):
    dense, sparse = tmp_path / "d.onnx", tmp_path / "s.onnx"
    for path, flag in ((dense, False), (sparse, True)):
        rep = compress(ae["model"], MagnitudeConfig(sparsity=0.9), ae["calib"], output=path,
                       options=RunOptions(sparse_storage=flag, progress=False))
    assert sparse.stat().st_size < 0.5 * dense.stat().st_size
    assert rep["output"]["sparse_bytes_saved"] > 0
    x = np.load(ae["test"])["input"][:8]
    yd = ort.InferenceSession(str(dense), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ys = ort.InferenceSession(str(sparse), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(yd, ys)


def test_n_of_m_pattern(ae, tmp_path):
    out = tmp_path / "nm.onnx"
    compress(ae["model"], _fast_fls(pattern="2:4", fit_steps=5), ae["calib"], output=out,
             options=RunOptions(num_calibration=128, progress=False))
    model = onnx.load(out)
    for site in prunable_initializers(model):
        w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == site.name))
        mat = w.T if site.op_type == "MatMul" else w  # (out, in) view; Gemm(transB=1) keeps (out, in)
        groups = mat.reshape(mat.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all()


@pytest.mark.slow
def test_resnet18_and_transformer_encoder_prune_and_verify(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.onnx.export(net, (x,), tmp_path / "r18.onnx", input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "r18.npz", input=np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32))
    rep = compress(
        tmp_path / "r18.onnx", FLSConfig(sparsity=0.5, q_init="diag", fit_steps=0, refit_steps=0, batch_size=4, moment_samples=4, steps=1),
        tmp_path / "r18.npz", output=tmp_path / "r18_p.onnx", options=QUIET,
    )
    assert len(rep["sparsity"]["per_layer"]) == 21
    assert rep["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)
    assert rep["verification"]["outputs"]["logits"]["cosine_similarity"] > 0.5

    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    enc = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    seq = torch.randn(2, 6, 32)
    torch.onnx.export(enc, (seq,), tmp_path / "enc.onnx", input_names=["tokens"], output_names=["hidden"], dynamic_axes={"tokens": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "enc.npz", tokens=np.random.default_rng(1).normal(size=(40, 6, 32)).astype(np.float32))
    rep = compress(tmp_path / "enc.onnx", _fast_fls(sparsity=0.5, fit_steps=10, refit_steps=5), tmp_path / "enc.npz",
                   output=tmp_path / "enc_p.onnx", options=QUIET)
    assert rep["likelihood"] == "gaussian"
    # nn.TransformerEncoder clones one layer, so the exporter stores each of the 4 weight matrices once
    # and both layers read it: the shared initializers are pruned as one tied tensor.
    assert len(rep["sparsity"]["per_layer"]) == 4
    assert rep["sparsity"]["achieved"] == pytest.approx(0.5, abs=1e-4)
    assert rep["verification"]["outputs"]["hidden"]["cosine_similarity"] > 0.8


def test_sparsegpt_prunes_graphs_onnx2torch_cannot_convert(tmp_path):
    """Layer-wise methods need only onnxruntime activations: a RandomNormalLike (refused by the bridge; here
    multiplied by 0, so the model stays deterministic) blocks the torch graph, not them."""
    from onnx import TensorProto, helper, numpy_helper

    from fls_compress.errors import UnsupportedModelError

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(24, 16)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("RandomNormalLike", ["h"], ["noise"], name="noise", seed=1.0),
         helper.make_node("Mul", ["noise", "zero"], ["silent"], name="silence"),
         helper.make_node("Add", ["h", "silent"], ["s"], name="add"),
         helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.zeros(1, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "shrink.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(128, 24)).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="RandomNormalLike"):
        compress(tmp_path / "shrink.onnx", FLSConfig(sparsity=0.5), tmp_path / "d.npz", output=tmp_path / "f.onnx", options=QUIET)
    rep = compress(tmp_path / "shrink.onnx", SparseGPTConfig(sparsity=0.5), tmp_path / "d.npz", output=tmp_path / "s.onnx", options=QUIET)
    assert rep["sparsity"]["achieved"] >= 0.5 and set(rep["sparsity"]["per_layer"]) == {"w1", "w2"}
    assert rep["verification"]["outputs"]["y"]["cosine_similarity"] > 0.5
