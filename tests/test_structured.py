"""Structured pruning (``prune --structure``): groups found in the graph, tensors that really shrink,
onnxruntime running the result, the structured OBS update against its closed form, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress import compress
from fls_compress.configs import MagnitudeConfig, RunOptions, SparseGPTConfig, config_from_dict
from fls_compress.errors import InvalidOptionError, UnsupportedModelError
from fls_compress.structured.groups import find_groups
from fls_compress.structured.selection import ConsumerSystem, damped_inverse, l2_select, obs_select, removal_count
from tests.test_cli import assert_one_line_error, run_cli

OPTS = RunOptions(progress=False, seed=0)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _run(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _bn_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv(2->6)-BN-Relu-MaxPool-Conv(6->4)+bias-Relu-Flatten-Gemm(4*4*4 -> 5): a channel group with a
    BatchNorm in between, and one that reaches a Gemm through Flatten (blocks of 4x4 features)."""
    f = np.float32
    inits = {
        "c1.w": rng.normal(size=(6, 2, 3, 3)).astype(f), "c1.b": rng.normal(size=6).astype(f),
        "bn.s": rng.uniform(0.5, 1.5, 6).astype(f), "bn.b": rng.normal(size=6).astype(f),
        "bn.m": rng.normal(size=6).astype(f) * 0.1, "bn.v": rng.uniform(0.5, 2.0, 6).astype(f),
        "c2.w": rng.normal(size=(4, 6, 3, 3)).astype(f) / 3, "c2.b": rng.normal(size=4).astype(f),
        "fc.w": rng.normal(size=(5, 64)).astype(f) / 8, "fc.b": rng.normal(size=5).astype(f),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["c"], name="relu1"),
        helper.make_node("MaxPool", ["c"], ["d"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["d", "c2.w", "c2.b"], ["e"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["e"], ["g"], name="relu2"),
        helper.make_node("Flatten", ["g"], ["h"], name="flat", axis=1),
        helper.make_node("Gemm", ["h", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "bn_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()],
                              value_info=[helper.make_tensor_value_info("d", TensorProto.FLOAT, ["n", 6, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.fixture()
def bn_cnn(tmp_path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    path = _save(_bn_cnn(rng), tmp_path / "bn_cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(96, 2, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "test.npz", x=rng.normal(size=(40, 2, 8, 8)).astype(np.float32))
    return {"model": path, "calib": tmp_path / "calib.npz", "test": tmp_path / "test.npz", "dir": tmp_path}


def test_groups_of_a_conv_bn_flatten_gemm_graph():
    model = _bn_cnn(np.random.default_rng(0))
    analysis = find_groups(model, "channels")
    assert analysis.skipped == []
    g1, g2 = analysis.groups
    assert (g1.producer, g1.size, [c.weight for c in g1.consumers], g1.consumers[0].block) == ("c1.w", 6, ["c2.w"], 9)
    assert {s.name for s in g1.slices} == {"c1.w", "c1.b", "bn.s", "bn.b", "bn.m", "bn.v"}
    assert (g2.producer, [c.weight for c in g2.consumers]) == ("c2.w", ["fc.w"])
    assert g2.consumers[0].block == 16  # 4x4 features per channel after Flatten
    neurons = find_groups(model, "neurons")
    assert neurons.groups == [] and "graph output" in neurons.skipped[0].reason


def test_magnitude_channels_shrink_tensors_and_equal_zeroed_columns(bn_cnn):
    """Removing channels is the same function as zeroing the consumers' input columns of those channels
    in the original (BatchNorm, MaxPool and the Flatten -> Gemm block mapping all exact)."""
    rep = compress(bn_cnn["model"], MagnitudeConfig(sparsity=0.5, structure="channels"), bn_cnn["calib"],
                   output=bn_cnn["dir"] / "out.onnx", eval_data=bn_cnn["test"], options=OPTS)
    out = onnx.load(str(bn_cnn["dir"] / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    new, old = _inits(out), _inits(onnx.load(str(bn_cnn["model"])))
    assert new["c1.w"].shape == (3, 2, 3, 3) and new["c1.b"].shape == (3,)
    assert all(new[k].shape == (3,) for k in ("bn.s", "bn.b", "bn.m", "bn.v"))
    assert new["c2.w"].shape == (2, 3, 3, 3) and new["c2.b"].shape == (2,)
    assert new["fc.w"].shape == (5, 32) and new["fc.b"].shape == (5,)
    groups = {g["producer"]: g for g in rep["structure"]["groups"]}
    removed1, removed2 = groups["c1.w"]["removed"], groups["c2.w"]["removed"]
    # L2 selection: the filters of least norm
    norms = np.linalg.norm(old["c1.w"].reshape(6, -1), axis=1)
    assert sorted(removed1) == sorted(np.argsort(norms, kind="stable")[:3].tolist())
    kept1 = [c for c in range(6) if c not in removed1]
    np.testing.assert_array_equal(new["bn.v"], old["bn.v"][kept1])
    # the reference: the original with the consumers' columns of the removed channels set to zero
    ref = _bn_cnn(np.random.default_rng(0))
    zeroed = {k: v.copy() for k, v in old.items()}
    zeroed["c2.w"][:, removed1] = 0.0
    zeroed["fc.w"].reshape(5, 4, 16)[:, removed2] = 0.0
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(zeroed[t.name], t.name))
    x = np.load(bn_cnn["test"])["x"]
    np.testing.assert_allclose(_run(out, x), _run(ref, x), rtol=1e-5, atol=1e-5)
    assert rep["structure"]["parameters"]["pruned"] < rep["structure"]["parameters"]["original"]
    assert rep["structure"]["size_bytes"]["pruned"] < rep["structure"]["size_bytes"]["original"]
    assert [b["batch"] for b in rep["latency"]["batches"]] == [1, 40]  # the report's one latency block
    assert rep["latency"]["verdict"] in rep["structure"]["speed_note"]
    assert rep["sparsity"]["achieved"] == pytest.approx(0.5)
    assert rep["sparsity"]["per_layer"]["fc.w"]["shape_after"] == [5, 32]


def _zero_removed(model: onnx.ModelProto, groups: list[dict]) -> onnx.ModelProto:
    """The reference for a magnitude (uncompensated) prune: the original with each consumer's input
    columns of the removed channels set to zero."""
    from fls_compress.structured.groups import consumer_slice

    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    arrays = _inits(ref)
    found = {g.producer: g for kind in ("channels", "neurons") for g in find_groups(model, kind).groups}
    for entry in groups:
        for consumer in found[entry["producer"]].consumers:
            s = consumer_slice(model, consumer)
            idx = ((s.offset + np.asarray(entry["removed"], dtype=np.int64))[:, None] * s.block + np.arange(s.block)).reshape(-1)
            view = np.moveaxis(arrays[s.name], s.axis, 0)
            view[idx] = 0.0
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return ref


def test_silu_and_reduce_mean_pass_channels_through(tmp_path):
    """Conv -> x*sigmoid(x) (SiLU as exported) -> Conv -> ReduceMean(H, W, keepdims=0) -> Gemm: both
    channel groups are removable, and the result equals the original with zeroed consumer columns."""
    rng = np.random.default_rng(5)
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(6, 2, 3, 3)).astype(f), "c1.w"),
             numpy_helper.from_array(rng.normal(size=(4, 6, 3, 3)).astype(f) / 3, "c2.w"),
             numpy_helper.from_array(rng.normal(size=(3, 4)).astype(f), "fc.w"),
             numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
             helper.make_node("Mul", ["a", "s"], ["silu"], name="silu"),
             helper.make_node("Conv", ["silu", "c2.w"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["b", "axes"], ["m"], name="gap", keepdims=0),
             helper.make_node("Gemm", ["m", "fc.w"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = _save(model, tmp_path / "silu.onnx")
    x = rng.normal(size=(32, 2, 6, 6)).astype(f)
    np.savez(tmp_path / "calib.npz", x=x)
    analysis = find_groups(model, "channels")
    assert [g.producer for g in analysis.groups] == ["c1.w", "c2.w"] and analysis.skipped == []
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert _inits(rep.model)["fc.w"].shape == (3, 2) and _inits(rep.model)["c2.w"].shape == (2, 3, 3, 3)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)


def test_gelu_with_constant_nodes_passes_neurons_through(tmp_path):
    """A transformer feed-forward block as torch's legacy exporter writes it: MatMul + Add -> GELU in its
    erf form with its scalars as Constant nodes (Div, Erf, Add, Mul, Mul) -> MatMul + Add. Scalar Constant
    operands are not per-channel: the hidden neurons are one removable group, and a magnitude prune equals
    the original with the second layer's rows of the removed neurons zeroed."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6)).eval()
    path = tmp_path / "ffn.onnx"
    torch.onnx.export(net, (torch.randn(2, 5, 6),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    model = onnx.load(path)
    assert any(n.op_type == "Constant" for n in model.graph.node) and any(n.op_type == "Erf" for n in model.graph.node)
    analysis = find_groups(model, "neurons")
    assert len(analysis.groups) == 1 and analysis.groups[0].size == 12
    x = np.random.default_rng(3).normal(size=(40, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="neurons"), tmp_path / "calib.npz", options=OPTS)
    assert rep["structure"]["channels_removed"] == 6
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)


class _ChannelLast(torch.nn.Module):
    """A Keras-style channel-last 1-D CNN as tf2onnx and torch exports write it: ExpandDims + NHWC->NCHW
    Transposes around each Conv2D, Squeeze back to [N, W, C], GlobalMaxPooling1D (ReduceMax over W),
    a Dense layer as MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(4, 8, (1, 3)), torch.nn.Conv2d(8, 6, (1, 3))
        self.w = torch.nn.Parameter(torch.randn(6, 5))

    def forward(self, x):  # [N, L, 4]
        h = torch.relu(self.c1(x.unsqueeze(1).permute(0, 3, 1, 2)))
        h = torch.nn.functional.max_pool2d(h, (1, 2)).permute(0, 2, 3, 1).squeeze(1)  # [N, W, 8]
        h = torch.relu(self.c2(h.unsqueeze(1).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).squeeze(1)
        return h.amax(1) @ self.w


def test_channel_last_transposes_squeezes_move_the_channel_axis(tmp_path):
    """Transpose / Squeeze / Unsqueeze with constant perm/axes carry the channels to a new axis: both Conv
    groups of a channel-last export are removable (the walk records where the channel axis went), and a
    magnitude prune equals the original with the consumers' columns zeroed; structured OBS runs too."""
    torch.manual_seed(4)
    path = tmp_path / "channel_last.onnx"
    x = np.random.default_rng(4).normal(size=(48, 20, 4)).astype(np.float32)
    torch.onnx.export(_ChannelLast().eval(), (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=x)
    model = onnx.load(path)
    analysis = find_groups(model, "channels")
    assert [g.producer for g in analysis.groups] == ["c1.weight", "c2.weight"] and analysis.skipped == []
    first = analysis.groups[0]
    moved = [(n.op_type, dict((name, axis) for name, axis, _, _ in first.tensors).get(n.output[0]))
             for n in model.graph.node if n.output[0] in {t[0] for t in first.tensors}]
    assert moved == [("Conv", -3), ("Relu", -3), ("MaxPool", -3), ("Transpose", -1), ("Squeeze", -1),
                     ("Unsqueeze", -1), ("Transpose", -3)]
    assert [c.op_type for c in analysis.groups[1].consumers] == ["MatMul"]
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert _inits(rep.model)["c2.weight"].shape == (3, 4, 1, 3) and _inits(rep.model)["w"].shape == (3, 5)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)
    obs = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert obs["structure"]["channels_removed"] == 7 and _run(obs.model, x).shape == (48, 5)


def test_constant_node_weights_are_promoted_and_pruned(bn_cnn):
    """paddle2onnx stores every weight as a Constant node: the structured prune moves the float ones to
    initializers of the same name (the function unchanged) and prunes them like initializers; the int64
    shape constant stays a node, and the parameter counts include Constant-node tensors."""
    original = onnx.load(str(bn_cnn["model"]))
    model = onnx.ModelProto()
    model.CopyFrom(original)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    consts.append(helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))))
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    flat = next(n for n in nodes if n.op_type == "Flatten")
    nodes[nodes.index(flat)] = helper.make_node("Reshape", ["g", "shape"], ["h"], name="flat")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = _save(model, bn_cnn["dir"] / "constants.onnx")
    x = np.load(bn_cnn["test"])["x"]
    np.testing.assert_allclose(_run(path, x), _run(original, x), rtol=1e-6, atol=1e-6)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), bn_cnn["calib"], options=OPTS)
    new = _inits(rep.model)
    assert new["c1.w"].shape == (3, 2, 3, 3) and new["fc.w"].shape == (5, 32) and len(new) == 10
    assert [n.output[0] for n in rep.model.graph.node if n.op_type == "Constant"] == ["shape"]
    assert rep["structure"]["constants_promoted"] == 10
    params = rep["structure"]["parameters"]
    assert params["original"] == sum(v.size for v in _inits(original).values()) + 2
    assert params["pruned"] == sum(v.size for v in new.values()) + 2
    # the same channels as the initializer model's prune, and the same outputs
    ref = compress(bn_cnn["model"], MagnitudeConfig(sparsity=0.5, structure="channels"), bn_cnn["calib"], options=OPTS)
    assert [g["removed"] for g in rep["structure"]["groups"]] == [g["removed"] for g in ref["structure"]["groups"]]
    np.testing.assert_allclose(_run(rep.model, x), _run(ref.model, x), rtol=1e-6, atol=1e-6)


def test_depthwise_conv_and_resize_pass_channels_through(tmp_path):
    """Conv 1x1 (2->6) -> Clip (ReLU6) -> depthwise Conv (group 6, bias) -> BatchNorm -> Relu -> Resize x2
    -> Conv (6->3): one group of 6 channels; the depthwise filters, bias and its group attribute shrink with
    it, and a magnitude prune equals the original with the consumer's columns zeroed."""
    rng = np.random.default_rng(7)
    f = np.float32
    arrays = {"e.w": rng.normal(size=(6, 2, 1, 1)), "dw.w": rng.normal(size=(6, 1, 3, 3)), "dw.b": rng.normal(size=6),
              "bn.s": rng.uniform(0.5, 1.5, 6), "bn.b": rng.normal(size=6), "bn.m": rng.normal(size=6) * 0.1,
              "bn.v": rng.uniform(0.5, 2, 6), "p.w": rng.normal(size=(3, 6, 1, 1)), "lo": np.array(0.0), "hi": np.array(6.0),
              "roi": np.zeros(0), "scales": np.array([1.0, 1.0, 2.0, 2.0])}
    inits = [numpy_helper.from_array(np.asarray(v, f), k) for k, v in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "e.w"], ["a"], name="expand"),
             helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="relu6"),
             helper.make_node("Conv", ["b", "dw.w", "dw.b"], ["c"], name="dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["d"], name="bn"),
             helper.make_node("Relu", ["d"], ["e"], name="relu"),
             helper.make_node("Resize", ["e", "roi", "scales"], ["r"], name="up", mode="nearest"),
             helper.make_node("Conv", ["r", "p.w"], ["y"], name="project")]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = _save(model, tmp_path / "dw.onnx")
    x = rng.normal(size=(24, 2, 5, 5)).astype(f)
    np.savez(tmp_path / "calib.npz", x=x)
    analysis = find_groups(model, "channels")
    assert [g.producer for g in analysis.groups] == ["e.w"] and analysis.groups[0].attributes == (("dw", "group", 0),)
    assert analysis.skipped[0].reason == "depthwise convolution: its channels go with the group of e.w"
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    new = _inits(rep.model)
    assert new["dw.w"].shape == (3, 1, 3, 3) and new["dw.b"].shape == (3,) and new["p.w"].shape == (3, 3, 1, 1)
    dw = next(n for n in rep.model.graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 3
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)
    # scales that resize the channel axis, and target sizes, end the walk with a reason
    for extra, reason in (({"scales": np.array([1.0, 2.0, 2.0, 2.0])}, "scales the channel axis"),):
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        for t in changed.graph.initializer:
            if t.name in extra:
                t.CopyFrom(numpy_helper.from_array(np.asarray(extra[t.name], f), t.name))
        assert reason in find_groups(changed, "channels").skipped[0].reason


def test_torchvision_inverted_residual_expansion_is_a_group(tmp_path):
    """torchvision's MobileNetV2 block (expand 1x1 + BN + ReLU6, depthwise 3x3 + BN + ReLU6, project 1x1 + BN,
    residual Add) as the legacy exporter writes it (BatchNorm folded): the expanded channels are one group
    through the depthwise convolution; structured OBS prunes it and onnxruntime runs the result."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    torch.manual_seed(0)
    block = InvertedResidual(8, 8, 1, 4).eval()
    for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # trained-like statistics (the
        bn.running_mean.uniform_(-0.5, 0.5)  # exporter shares equal folded biases, e.g. the zeros of fresh BatchNorms)
        bn.running_var.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-0.5, 0.5)
    path = tmp_path / "block.onnx"
    x = np.random.default_rng(0).normal(size=(32, 8, 6, 6)).astype(np.float32)
    torch.onnx.export(block, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=x)
    analysis = find_groups(onnx.load(path), "channels")
    assert [g.size for g in analysis.groups] == [32] and len(analysis.groups[0].consumers) == 1
    rep = compress(path, SparseGPTConfig(sparsity=0.25, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert rep["structure"]["channels_removed"] == 8
    assert sorted(v.shape for v in _inits(rep.model).values() if v.ndim == 4) == [(8, 24, 1, 1), (24, 1, 3, 3), (24, 8, 1, 1)]
    out, dense = _run(rep.model, x), _run(path, x)
    assert out.shape == dense.shape and np.isfinite(out).all()
    # the OBS refit of the project conv beats dropping the same number of channels by L2 norm, on the
    # calibration inputs whose least-squares error it minimises
    mag = compress(path, MagnitudeConfig(sparsity=0.25, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert np.linalg.norm(out - dense) < 0.5 * np.linalg.norm(_run(mag.model, x) - dense)


def _concat_model(rng) -> onnx.ModelProto:
    """Conv A (2->4) and Conv B (2->3) of one input, Concat on channels (7) -> BatchNorm -> Relu -> Conv (7->2)."""
    f = np.float32
    arrays = {"a.w": rng.normal(size=(4, 2, 3, 3)), "a.b": rng.normal(size=4), "b.w": rng.normal(size=(3, 2, 1, 1)),
              "bn.s": rng.uniform(0.5, 1.5, 7), "bn.b": rng.normal(size=7), "bn.m": rng.normal(size=7) * 0.1,
              "bn.v": rng.uniform(0.5, 2, 7), "c.w": rng.normal(size=(2, 7, 3, 3)) / 3, "c.b": rng.normal(size=2)}
    nodes = [helper.make_node("Conv", ["x", "a.w", "a.b"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "b.w"], ["b"], name="conv_b"),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             helper.make_node("BatchNormalization", ["cat", "bn.s", "bn.b", "bn.m", "bn.v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c.w", "c.b"], ["y"], name="conv_c", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "cat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [numpy_helper.from_array(np.asarray(v, f), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_concat_on_channels_offsets_each_group(tmp_path):
    """Two producers joined by a Concat on the channel axis are two groups, the second at offset 4 of 7 in
    the BatchNorm vectors and the consumer's input channels; pruning both (the second re-analysed after the
    first shrank the Concat) equals the original with the consumer's columns of both removals zeroed."""
    rng = np.random.default_rng(11)
    model = _concat_model(rng)
    path = _save(model, tmp_path / "cat.onnx")
    x = rng.normal(size=(40, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    groups = find_groups(model, "channels").groups
    assert [(g.producer, g.consumers[0].offset, g.consumers[0].extra) for g in groups] == [("a.w", 0, 3), ("b.w", 4, 4)]
    assert [(s.name, s.offset, s.extra) for s in groups[1].slices if s.name.startswith("bn")][0] == ("bn.s", 4, 4)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    new = _inits(rep.model)
    assert new["a.w"].shape == (2, 2, 3, 3) and new["b.w"].shape == (1, 2, 1, 1)
    assert new["bn.v"].shape == (3,) and new["c.w"].shape == (2, 3, 3, 3)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)
    dense, mag = _run(path, x), _run(rep.model, x)
    for sequential in (True, False):  # False: the second group's consumer Hessian is captured again
        obs = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels", sequential=sequential),
                       tmp_path / "calib.npz", options=OPTS)
        assert _inits(obs.model)["c.w"].shape == (2, 3, 3, 3)
        assert np.linalg.norm(_run(obs.model, x) - dense) < np.linalg.norm(mag - dense)


def _residual_model(rng) -> onnx.ModelProto:
    """stem Conv (1->4) + BN + Relu = x0; Conv a (4->3) + Relu -> Conv b (3->4); Add(b, x0) + Relu -> Conv c (4->2)."""
    f = np.float32
    arrays = {"stem.w": rng.normal(size=(4, 1, 3, 3)), "bn.s": rng.uniform(0.5, 1.5, 4), "bn.b": rng.normal(size=4),
              "bn.m": rng.normal(size=4) * 0.1, "bn.v": rng.uniform(0.5, 2, 4), "a.w": rng.normal(size=(3, 4, 3, 3)) / 3,
              "b.w": rng.normal(size=(4, 3, 3, 3)) / 3, "b.b": rng.normal(size=4), "c.w": rng.normal(size=(2, 4, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "stem.w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["s", "bn.s", "bn.b", "bn.m", "bn.v"], ["sn"], name="bn"),
             helper.make_node("Relu", ["sn"], ["x0"], name="relu0"),
             helper.make_node("Conv", ["x0", "a.w"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             helper.make_node("Conv", ["ar", "b.w", "b.b"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["b", "x0"], ["sum"], name="residual"),
             helper.make_node("Relu", ["sum"], ["x1"], name="relu1"),
             helper.make_node("Conv", ["x1", "c.w"], ["y"], name="conv_c")]
    graph = helper.make_graph(nodes, "resnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [numpy_helper.from_array(np.asarray(v, f), k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_residual_add_couples_the_stem_and_the_block_output(tmp_path):
    """The stem's channels meet conv b's in the residual Add: the two producers form one coupled group
    (channel j of both removed together, BatchNorm and the readers conv a and conv c shrinking with it);
    magnitude ranks by the L2 norm of both filters together, and its result equals the original with the
    consumers' columns zeroed; structured OBS beats it on the calibration inputs."""
    rng = np.random.default_rng(13)
    model = _residual_model(rng)
    path = _save(model, tmp_path / "res.onnx")
    x = rng.normal(size=(48, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    analysis = find_groups(model, "channels")
    coupled = analysis.groups[0]
    assert (coupled.producer, coupled.coupled) == ("stem.w", ("b.w",))
    assert [s.producer for s in analysis.skipped] == ["c.w"]  # its output is the graph output
    assert sorted(c.node for c in coupled.consumers) == ["conv_a", "conv_c"]
    assert {s.name for s in coupled.slices} == {"stem.w", "b.w", "b.b", "bn.s", "bn.b", "bn.m", "bn.v"}
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    old, new = _inits(model), _inits(rep.model)
    entry = next(g for g in rep["structure"]["groups"] if g["producer"] == "stem.w")
    assert entry["coupled"] == ["b.w"]
    norms = (old["stem.w"].reshape(4, -1) ** 2).sum(1) + (old["b.w"].reshape(4, -1) ** 2).sum(1)
    assert sorted(entry["removed"]) == sorted(np.argsort(norms, kind="stable")[:2].tolist())
    # conv a's own group (3 channels -> 1 kept) shrinks b's input side
    assert new["stem.w"].shape == (2, 1, 3, 3) and new["b.w"].shape == (2, 1, 3, 3) and new["c.w"].shape == (2, 2, 1, 1)
    assert new["a.w"].shape == (1, 2, 3, 3) and new["bn.v"].shape == (2,) and new["b.b"].shape == (2,)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)
    obs = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    dense = _run(path, x)
    assert np.linalg.norm(_run(obs.model, x) - dense) < np.linalg.norm(_run(rep.model, x) - dense)


def test_squeeze_excitation_gate_couples_the_excite_layer(tmp_path):
    """torchvision's SqueezeExcitation after a Conv (x * sigmoid(fc2(relu(fc1(avgpool(x)))))): the gate's
    channels come from fc2, which joins the Conv's group; fc1 reads the group through the pooling; the
    magnitude prune equals the original with the readers' columns zeroed."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), SqueezeExcitation(8, 4),
                              torch.nn.Conv2d(8, 5, 1)).eval()
    path = tmp_path / "se.onnx"
    x = np.random.default_rng(2).normal(size=(32, 3, 6, 6)).astype(np.float32)
    torch.onnx.export(net, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=x)
    model = onnx.load(path)
    groups = {g.producer: g for g in find_groups(model, "channels").groups}
    assert groups["0.weight"].coupled == ("2.fc2.weight",)
    assert sorted(c.weight for c in groups["0.weight"].consumers) == ["2.fc1.weight", "3.weight"]
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert _inits(rep.model)["2.fc2.weight"].shape == (4, 2, 1, 1) and _inits(rep.model)["3.weight"].shape == (5, 4, 1, 1)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)


def test_unsqueeze_negative_axes_and_squeeze_without_axes():
    """Unsqueeze(axes=[-1]) keeps the channels at position 1 (axis -4 of the rank-5 result), Squeeze of
    that axis brings them back; a Squeeze without axes (which axes go depends on shapes) is refused."""
    f = np.float32
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(f), "c1.w"),
             numpy_helper.from_array(rng.normal(size=(3, 4, 3, 3)).astype(f), "c2.w"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.array([4], np.int64), "fifth")]

    def graph(squeeze_axes: list[str]) -> onnx.ModelProto:
        nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1"),
                 helper.make_node("Unsqueeze", ["a", "last"], ["b"], name="unsq"),
                 helper.make_node("Squeeze", ["b"] + squeeze_axes, ["c"], name="sq"),
                 helper.make_node("Conv", ["c", "c2.w"], ["y"], name="conv2")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    ok = find_groups(graph(["fifth"]), "channels")
    assert [(n, a) for n, a, _, _ in ok.groups[0].tensors] == [("a", -3), ("b", -4), ("c", -3)]
    refused = find_groups(graph([]), "channels")
    assert refused.groups == [] and "Squeeze node sq has no axes" in refused.skipped[0].reason


def _mlp(rng, hidden: int = 8, d_in: int = 6, d_out: int = 3) -> onnx.ModelProto:
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(hidden, d_in)).astype(f), "w1"),
             numpy_helper.from_array(rng.normal(size=hidden).astype(f), "b1"),
             numpy_helper.from_array(rng.normal(size=(hidden, d_out)).astype(f), "w2"),  # transB=0: (in, out)
             numpy_helper.from_array(rng.normal(size=d_out).astype(f), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Tanh", ["h"], ["t"], name="act"),
             helper.make_node("Gemm", ["t", "w2", "b2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_obs_removal_equals_least_squares_refit():
    """One block removed by structured OBS = the least-squares refit of the remaining columns (and the
    cost = half the increase of the mean squared output error times 2/n scale of H)."""
    rng = np.random.default_rng(1)
    n, blocks, b, out = 200, 5, 3, 4
    x = rng.normal(size=(n, blocks * b)) + rng.normal(size=(n, 1))  # correlated columns
    w = rng.normal(size=(out, blocks * b))
    h = torch.from_numpy(2.0 * x.T @ x / n)
    system = ConsumerSystem(torch.from_numpy(w.copy()), damped_inverse(h, 0.0), b, False)
    keep, costs = obs_select([system], blocks, 1)
    removed = sorted(set(range(blocks)) - set(keep.tolist()))[0]
    cols = [c for c in range(blocks * b) if c // b != removed]
    target = x @ w.T
    refit, *_ = np.linalg.lstsq(x[:, cols], target, rcond=None)
    full = system.full().numpy()
    np.testing.assert_allclose(full[:, cols], refit.T, rtol=1e-8, atol=1e-10)
    assert np.abs(full[:, [c for c in range(blocks * b) if c // b == removed]]).max() == 0.0
    err = ((x[:, cols] @ refit - target) ** 2).sum() / n
    assert costs[0] == pytest.approx(err, rel=1e-8)  # 1/2 w (H^-1_SS)^-1 w^T with H = 2 X^T X / n
    # and the greedy choice is the block whose refit costs least
    errs = []
    for r in range(blocks):
        c = [k for k in range(blocks * b) if k // b != r]
        v, *_ = np.linalg.lstsq(x[:, c], target, rcond=None)
        errs.append(((x[:, c] @ v - target) ** 2).sum() / n)
    assert removed == int(np.argmin(errs))


@pytest.mark.parametrize("b", [1, 4])
def test_greedy_obs_after_several_removals_is_the_refit_on_what_remains(b):
    """Each OBS step is exact, so after removing several blocks the weights are the least-squares refit
    on the remaining columns (blocks of 1 use the scalar branch)."""
    rng = np.random.default_rng(7)
    n, blocks, out = 300, 6, 3
    x = rng.normal(size=(n, blocks * b)) @ rng.normal(size=(blocks * b, blocks * b)) * 0.3 + rng.normal(size=(n, blocks * b))
    w = rng.normal(size=(out, blocks * b))
    system = ConsumerSystem(torch.from_numpy(w.copy()), damped_inverse(torch.from_numpy(2.0 * x.T @ x / n), 0.0), b, False)
    keep, costs = obs_select([system], blocks, 3)
    cols = [c for c in range(blocks * b) if c // b in keep.tolist()]
    refit, *_ = np.linalg.lstsq(x[:, cols], x @ w.T, rcond=None)
    np.testing.assert_allclose(system.full().numpy()[:, cols], refit.T, rtol=1e-7, atol=1e-9)
    assert len(costs) == 3 and all(np.isfinite(costs))


@pytest.mark.parametrize("b", [1, 3])
def test_lazy_eliminations_across_flushes_equal_the_refit_and_the_restricted_inverse(b, monkeypatch):
    """Downdates of H^-1 kept as low-rank factors and applied every LAZY_REMOVALS removals (here 2, so
    most removals happen between flushes): the weights are still the least-squares refit on what remains,
    and the final H^-1 is the inverse of H restricted to the remaining columns (zero elsewhere)."""
    import fls_compress.structured.selection as selection

    monkeypatch.setattr(selection, "LAZY_REMOVALS", 2)
    rng = np.random.default_rng(11)
    n, blocks, out = 400, 12, 5
    x = rng.normal(size=(n, blocks * b)) @ rng.normal(size=(blocks * b, blocks * b)) * 0.3 + rng.normal(size=(n, blocks * b))
    w = rng.normal(size=(out, blocks * b))
    h = 2.0 * x.T @ x / n
    system = ConsumerSystem(torch.from_numpy(w.copy()), damped_inverse(torch.from_numpy(h), 0.0), b, False)
    keep, costs = obs_select([system], blocks, 7)  # 7 removals: 3 flushes of 2 and one at the end
    cols = [c for c in range(blocks * b) if c // b in keep.tolist()]
    gone = [c for c in range(blocks * b) if c not in cols]
    refit, *_ = np.linalg.lstsq(x[:, cols], x @ w.T, rcond=None)
    np.testing.assert_allclose(system.full().numpy()[:, cols], refit.T, rtol=1e-7, atol=1e-9)
    assert np.abs(system.full().numpy()[:, gone]).max() == 0.0
    hinv = system.hinv.numpy()
    np.testing.assert_allclose(hinv[np.ix_(cols, cols)], np.linalg.inv(h[np.ix_(cols, cols)]), rtol=1e-8, atol=1e-10)
    assert np.abs(hinv[gone]).max() == 0.0 and np.abs(hinv[:, gone]).max() == 0.0
    assert len(costs) == 7 and all(np.isfinite(costs))
    # every greedy step against brute force: the block whose removal (after the earlier ones) raises the
    # refit error least, and that increase as its cost (H = 2 X^T X / n: cost = increase of mean sq. error)
    alive, target = list(range(blocks)), x @ w.T

    def refit_error(kept: list[int]) -> float:
        c = [k for k in range(blocks * b) if k // b in kept]
        v, *_ = np.linalg.lstsq(x[:, c], target, rcond=None)
        return float(((x[:, c] @ v - target) ** 2).sum() / n)

    for step in range(7):
        base = refit_error(alive)
        errs = {r: refit_error([a for a in alive if a != r]) - base for r in alive}
        best = min(errs, key=errs.get)
        assert costs[step] == pytest.approx(errs[best], rel=1e-6)
        alive.remove(best)
    assert alive == keep.tolist()


def test_sparsegpt_neurons_compensate_consumer_with_bias_exactly(tmp_path):
    """End to end: -m sparsegpt --structure neurons removes one hidden unit and refits the next Gemm's
    remaining weights and its bias by least squares on the captured activations (percdamp 0)."""
    rng = np.random.default_rng(2)
    model = _mlp(rng)
    path = _save(model, tmp_path / "mlp.onnx")
    x = rng.normal(size=(150, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "test.npz", x=x[:30])
    config = SparseGPTConfig(sparsity=0.125, structure="neurons", percdamp=0.0)  # 1 of 8
    rep = compress(path, config, tmp_path / "calib.npz", output=tmp_path / "out.onnx", eval_data=tmp_path / "test.npz",
                   options=OPTS)
    old, new = _inits(model), _inits(onnx.load(str(tmp_path / "out.onnx")))
    (group,) = rep["structure"]["groups"]
    assert group["bias_compensated"] == ["fc2"]
    kept = [j for j in range(8) if j not in group["removed"]]
    assert new["w1"].shape == (7, 6) and new["b1"].shape == (7,) and new["w2"].shape == (7, 3)
    t = np.tanh(x.astype(np.float64) @ old["w1"].T.astype(np.float64) + old["b1"])
    target = t @ old["w2"].astype(np.float64) + old["b2"]
    design = np.concatenate([t[:, kept], np.ones((len(t), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    np.testing.assert_allclose(new["w2"], coef[:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["b2"], coef[-1], rtol=1e-4, atol=1e-5)
    y = _run(tmp_path / "out.onnx", x)
    np.testing.assert_allclose(y, design @ coef, rtol=1e-4, atol=1e-4)


def test_residual_coupled_channels_are_skipped_with_reason(tmp_path):
    """conv1 -> relu -> conv2 -> Add(relu, conv2) -> conv3: both channel groups feeding the Add are left
    whole (reason in the report); conv3's own group (-> conv4) is pruned."""
    rng = np.random.default_rng(3)
    f = np.float32
    inits = {f"c{i}.w": rng.normal(size=shape).astype(f) / 3 for i, shape in
             enumerate([(4, 1, 3, 3), (4, 4, 3, 3), (6, 4, 1, 1), (2, 6, 1, 1)], start=1)}
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2.w"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["r", "b"], ["s"], name="residual"),
             helper.make_node("Conv", ["s", "c3.w"], ["c"], name="conv3"),
             helper.make_node("Relu", ["c"], ["d"], name="relu3"),
             helper.make_node("Conv", ["d", "c4.w"], ["y"], name="conv4")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 6, 6])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "res.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(40, 1, 6, 6)).astype(f))
    rep = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz",
                   output=tmp_path / "out.onnx", eval_data=tmp_path / "calib.npz", options=OPTS)
    skipped = {s["producer"]: s["reason"] for s in rep["structure"]["skipped"]}
    assert set(skipped) == {"c1.w", "c2.w", "c4.w"}
    assert "residual" in skipped["c1.w"] and "residual" in skipped["c2.w"]
    assert "graph output" in skipped["c4.w"]
    assert [g["producer"] for g in rep["structure"]["groups"]] == ["c3.w"]
    new = _inits(onnx.load(str(tmp_path / "out.onnx")))
    assert new["c3.w"].shape == (3, 4, 1, 1) and new["c4.w"].shape == (2, 3, 1, 1) and new["c2.w"].shape == (4, 4, 3, 3)
    assert any("leaves c1.w" in w for w in rep["warnings"])


def test_torch_exported_cnn_runs_after_both_methods(tmp_path):
    from sample_models.build_samples import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(64, 1, 12, 12)
    export_onnx(net, x[:2], tmp_path / "cnn.onnx")
    np.savez(tmp_path / "calib.npz", input=x.numpy())
    for structure in ("channels", "neurons"):
        for config in (MagnitudeConfig(sparsity=0.5, structure=structure),
                       SparseGPTConfig(sparsity=0.5, structure=structure)):
            out = tmp_path / f"{config.method}_{structure}.onnx"
            rep = compress(tmp_path / "cnn.onnx", config, tmp_path / "calib.npz", output=out, eval_data=tmp_path / "calib.npz",
                           options=OPTS)
            assert rep["status"] == "ok" and rep["structure"]["channels_removed"] == (8 if structure == "channels" else 8)
            y = _run(out, x.numpy())
            assert y.shape == (64, 4) and np.isfinite(y).all()
            assert rep["structure"]["parameters"]["pruned"] < rep["structure"]["parameters"]["original"]


def test_selection_helpers():
    assert [removal_count(16, s) for s in (0.0, 0.3, 0.5, 0.99)] == [0, 5, 8, 15]
    assert [removal_count(32, s, 8) for s in (0.0, 0.1, 0.3, 0.5, 0.99)] == [0, 0, 8, 16, 24]
    assert removal_count(6, 0.5, 8) == 0
    rows = torch.tensor([[3.0, 0.0], [0.1, 0.1], [1.0, 1.0], [0.0, 0.2]])
    assert l2_select(rows, 2).tolist() == [0, 2]


def test_config_refusals():
    with pytest.raises(InvalidOptionError, match="--pattern does not apply to --structure"):
        MagnitudeConfig(pattern="2:4", structure="channels")
    with pytest.raises(InvalidOptionError, match="--structure must be one of"):
        SparseGPTConfig(structure="layers")
    with pytest.raises(InvalidOptionError, match="unknown key"):
        config_from_dict({"method": "fls", "structure": "channels"})
    with pytest.raises(InvalidOptionError, match="--channel-multiple applies to --structure"):
        MagnitudeConfig(channel_multiple=8)
    assert config_from_dict(SparseGPTConfig(structure="neurons").to_dict()) == SparseGPTConfig(structure="neurons")


def test_no_prunable_group_is_unsupported(tmp_path):
    rng = np.random.default_rng(4)
    path = _save(_mlp(rng), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(20, 6)).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="no channels group"):
        compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)


def test_sparse_storage_with_structure_is_refused(bn_cnn):
    with pytest.raises(InvalidOptionError, match="--sparse-storage does not apply to --structure"):
        compress(bn_cnn["model"], MagnitudeConfig(structure="channels"), bn_cnn["calib"],
                 options=RunOptions(progress=False, sparse_storage=True))


def test_cli_structure_refusals_exit_2(bn_cnn):
    """Methods without a structured variant and unknown structures are usage errors (exit 2)."""
    common = [str(bn_cnn["model"]), "--data", str(bn_cnn["calib"]), "-o", str(bn_cnn["dir"] / "o.onnx")]
    assert_one_line_error(run_cli("prune", *common, "-m", "fls", "--structure", "channels"), 2,
                          "--structure does not apply to -m fls")
    proc = run_cli("prune", *common, "-m", "sparsegpt", "--structure", "layers")
    assert proc.returncode == 2 and "layers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (bn_cnn["dir"] / "o.onnx").exists()


@pytest.mark.parametrize("base, change", [
    (MagnitudeConfig(sparsity=0.5), dict(structure="channels")),
    (SparseGPTConfig(sparsity=0.5), dict(structure="channels")),
    (SparseGPTConfig(sparsity=0.5, structure="channels"), dict(sequential=False)),
    (SparseGPTConfig(sparsity=0.5, structure="channels"), dict(percdamp=1.0)),
    (SparseGPTConfig(sparsity=0.5, structure="channels"), dict(max_rows_per_layer=16)),
    (SparseGPTConfig(sparsity=0.5, structure="channels"), dict(exclude=("fc.w",))),
    (MagnitudeConfig(sparsity=0.5, structure="channels"), dict(sparsity=0.3)),
    (MagnitudeConfig(sparsity=0.3, structure="channels"), dict(channel_multiple=2)),
], ids=["magnitude-structure", "sparsegpt-structure", "sequential", "percdamp", "max_rows", "exclude", "sparsity",
        "channel_multiple"])
def test_structured_knobs_change_the_result(bn_cnn, base, change):
    def arrays(config):
        rep = compress(bn_cnn["model"], config, bn_cnn["calib"], options=OPTS)
        return _inits(rep.model)

    a, b = arrays(base), arrays(base.replace(**change))
    assert set(a) == set(b)
    assert any(a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]) for k in a), change


def test_3d_convolution_consumer_is_magnitude_only(tmp_path):
    """Structured OBS captures 1-D/2-D convolution inputs only: a 3-D consumer leaves its group whole (with
    the reason), while -m magnitude removes the channels."""
    rng = np.random.default_rng(8)
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3, 3)).astype(f), "c1.w"),
             numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1, 1)).astype(f), "c2.w")]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1", pads=[1] * 6),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "c2.w"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "c3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 4, 4, 4])], inits)
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "c3d.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(8, 1, 4, 4, 4)).astype(f))
    with pytest.raises(UnsupportedModelError, match="3-D convolution"):
        compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    assert _inits(rep.model)["c2.w"].shape == (2, 2, 1, 1, 1)
    assert _run(rep.model, np.zeros((1, 1, 4, 4, 4), f)).shape == (1, 2, 4, 4, 4)


def _reshaped_bias_se(rng, shared_shape: bool = False) -> onnx.ModelProto:
    """Older paddle2onnx style: Conv without bias + Add(Reshape(bias [C], Constant [1, C, 1, 1])), and a
    squeeze-excitation gate whose two 1x1 convolutions add their biases the same way (the first with
    [1, -1, 1, 1]); ``shared_shape``: the gate's second Reshape reuses the stem's shape constant."""
    f = np.float32
    arrays = {"c1.w": rng.normal(size=(8, 3, 3, 3)), "c1.b": rng.normal(size=8), "f1.w": rng.normal(size=(4, 8, 1, 1)),
              "f1.b": rng.normal(size=4), "f2.w": rng.normal(size=(8, 4, 1, 1)), "f2.b": rng.normal(size=8),
              "c2.w": rng.normal(size=(5, 8, 1, 1))}
    inits = [numpy_helper.from_array(np.asarray(v, f), k) for k, v in arrays.items()]
    shape = {"s1": [1, 8, 1, 1], "s2": [1, -1, 1, 1], "s3": [1, 8, 1, 1]}
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(np.array(v, np.int64), k))
             for k, v in shape.items()]
    nodes += [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
              helper.make_node("Reshape", ["c1.b", "s1"], ["b1"], name="rs1"),
              helper.make_node("Add", ["a", "b1"], ["a2"], name="add1"),
              helper.make_node("Relu", ["a2"], ["r"], name="relu1"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="squeeze"),
              helper.make_node("Conv", ["p", "f1.w"], ["q"], name="fc1"),
              helper.make_node("Reshape", ["f1.b", "s2"], ["b2"], name="rs2"),
              helper.make_node("Add", ["q", "b2"], ["q2"], name="add2"),
              helper.make_node("Relu", ["q2"], ["q3"], name="relu2"),
              helper.make_node("Conv", ["q3", "f2.w"], ["u"], name="fc2"),
              helper.make_node("Reshape", ["f2.b", "s1" if shared_shape else "s3"], ["b3"], name="rs3"),
              helper.make_node("Add", ["u", "b3"], ["u2"], name="add3"),
              helper.make_node("HardSigmoid", ["u2"], ["gate"], name="hsig"),
              helper.make_node("Mul", ["r", "gate"], ["m"], name="excite"),
              helper.make_node("Conv", ["m", "c2.w"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "paddle_se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_reshaped_constant_biases_shrink_with_their_channels(tmp_path):
    """Biases added through Reshape of a constant vector (PP-OCR v2.0 exports): the vector loses the removed
    channels' entries, a shape constant that spells the channel count out gets the kept count ([1, -1, 1, 1]
    stays), the SE gate's excite layer is a coupled producer, and the magnitude prune equals the original
    with the readers' columns zeroed; a shape constant shared by two Reshapes leaves the group whole."""
    rng = np.random.default_rng(11)
    model = _reshaped_bias_se(rng)
    path = _save(model, tmp_path / "se.onnx")
    x = rng.normal(size=(32, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    groups = {g.producer: g for g in find_groups(model, "channels").groups}
    assert sorted(groups) == ["c1.w", "f1.w"] and groups["c1.w"].coupled == ("f2.w",)
    assert sorted(groups["c1.w"].shape_constants) == [("s1", 1, 0, "b1", 1), ("s3", 1, 0, "b3", 1)]
    assert groups["f1.w"].shape_constants == ()
    assert {s.name for s in groups["c1.w"].slices if s.role == "constant"} == {"c1.b", "f2.b"}
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    new = _inits(rep.model)
    assert new["c1.b"].shape == (4,) and new["f2.b"].shape == (4,) and new["f1.b"].shape == (2,)
    assert new["c2.w"].shape == (5, 4, 1, 1) and new["f2.w"].shape == (4, 2, 1, 1)
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t).tolist() for n in rep.model.graph.node
              if n.op_type == "Constant"}
    assert consts == {"s1": [1, 4, 1, 1], "s2": [1, -1, 1, 1], "s3": [1, 4, 1, 1]}
    kept = np.setdiff1d(np.arange(8), rep["structure"]["groups"][0]["removed"])
    np.testing.assert_array_equal(new["c1.b"], _inits(model)["c1.b"][kept])
    np.testing.assert_allclose(_run(rep.model, x), _run(_zero_removed(model, rep["structure"]["groups"]), x),
                               rtol=1e-5, atol=1e-5)
    obs = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    dense = _run(path, x)
    assert np.linalg.norm(_run(obs.model, x) - dense) < np.linalg.norm(_run(rep.model, x) - dense)
    shared = find_groups(_reshaped_bias_se(np.random.default_rng(11), shared_shape=True), "channels")
    assert [g.producer for g in shared.groups] == ["f1.w"]
    assert "shape constant 's1' of Reshape node rs1 is shared with other nodes" in shared.skipped[0].reason


class _ViewNet(torch.nn.Module):
    """Conv -> Relu -> view -> Linear, the target of the view by ``mode``: ``batch`` x.view(x.size(0), -1),
    ``batch_features`` x.view(x.size(0), 128), ``static`` x.view(-1, 128), ``channels`` x.view(N, C, -1)
    (then the Linear reads H*W). With a dynamic batch the TorchScript exporter computes a target that
    reads x.size(...) from Shape -> Gather -> Unsqueeze -> Concat."""

    def __init__(self, mode: str):
        super().__init__()
        self.conv, self.mode = torch.nn.Conv2d(3, 8, 3), mode
        self.fc = torch.nn.Linear(16 if mode == "channels" else 8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.mode == "channels":
            return self.fc(y.view(y.size(0), y.size(1), -1)).sum(1)
        if self.mode == "static":
            return self.fc(y.view(-1, 8 * 4 * 4))
        return self.fc(y.view(y.size(0), 8 * 4 * 4 if self.mode == "batch_features" else -1))


@pytest.mark.parametrize("mode", ["batch", "batch_features", "static", "channels"])
def test_flatten_targets_computed_or_spelled_out(tmp_path, mode):
    """The Reshape targets of a flatten as exported with a dynamic batch: the Shape node reads only the
    batch size, -1 needs no change and a feature count C*H*W spelled out in a constant (x.view(-1, 128),
    or inside the computed target) becomes kept*H*W; the conv's channels shrink and the Linear loses their
    blocks of 16 columns, equal to the zeroed reference at another batch size. A target that reads the
    channel count (x.view(N, C, -1)) leaves the group whole with the reason."""
    torch.manual_seed(4)
    net = _ViewNet(mode).eval()
    path = tmp_path / "view.onnx"
    x = np.random.default_rng(4).normal(size=(32, 3, 6, 6)).astype(np.float32)
    torch.onnx.export(net, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    model = onnx.load(path)
    assert ("Shape" in {n.op_type for n in model.graph.node}) == (mode != "static")
    analysis = find_groups(model, "channels")
    if mode == "channels":
        assert not analysis.groups and "reads the channel count" in analysis.skipped[0].reason
        return
    group, = analysis.groups
    assert group.producer == "conv.weight" and [c.block for c in group.consumers] == [16]
    # (entry, other channels, Reshape output, features per channel): static [-1, 128] holds it at 1, the
    # computed target in its own [128] constant (Concat of [N] and [128]) at 0
    expected = {"batch": [], "batch_features": [(0, 0, "/Reshape_output_0", 16)], "static": [(1, 0, "/Reshape_output_0", 16)]}
    assert [s[1:] for s in group.shape_constants] == expected[mode]
    np.savez(tmp_path / "calib.npz", x=x)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    new = _inits(rep.model)
    assert new["conv.weight"].shape == (4, 3, 3, 3) and new["fc.weight"].shape == (5, 64)
    np.testing.assert_allclose(_run(rep.model, x[:7]), _run(_zero_removed(model, rep["structure"]["groups"]), x[:7]),
                               rtol=1e-5, atol=1e-5)
    consts = [numpy_helper.to_array(n.attribute[0].t).tolist() for n in rep.model.graph.node if n.op_type == "Constant"]
    assert {"batch": [-1], "batch_features": [64], "static": [-1, 64]}[mode] in consts
    obs = compress(path, SparseGPTConfig(sparsity=0.5, structure="channels"), tmp_path / "calib.npz", options=OPTS)
    dense = _run(path, x)
    assert np.linalg.norm(_run(obs.model, x) - dense) < np.linalg.norm(_run(rep.model, x) - dense)


def test_shape_expressions_follow_gather_slice_concat():
    """shape_expr evaluates the exporters' shape computations to run-time dims and constants."""
    from fls_compress.structured.shape_expr import shape_expr
    from fls_compress.structured.walk import GraphIndex

    i64 = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64), name))  # noqa: E731
    nodes = [i64("zero", 0), i64("st", [1]), i64("en", [9]), i64("ax", [0]), i64("minus", [-1]),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]), helper.make_node("Cast", ["s"], ["sc"], to=TensorProto.INT32),
             helper.make_node("Slice", ["sc", "st", "en", "ax"], ["hw"]), helper.make_node("Shape", ["x"], ["tail"], start=-2),
             helper.make_node("Concat", ["n1", "minus", "hw", "tail"], ["t"], axis=0)]
    graph = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 5])],
                              [helper.make_tensor_value_info("t", TensorProto.INT64, [None])])
    g = GraphIndex(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    x = lambda k: ("x", k)  # noqa: E731
    assert shape_expr(g, "t") == [x(0), -1, x(1), x(2), x(3), x(2), x(3)]
    assert shape_expr(g, "n") == [x(0)] and shape_expr(g, "x") is None
