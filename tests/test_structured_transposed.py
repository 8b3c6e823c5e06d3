"""``--structure channels`` through a ConvTranspose that reads a group's channels (the upsampling heads of
text-detection and segmentation exports): its weight loses the removed input rows with -m magnitude, and
structured OBS leaves the group whole with the reason (no Hessian of a transposed convolution)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress import compress
from fls_compress.configs import MagnitudeConfig, RunOptions, SparseGPTConfig
from fls_compress.structured.groups import find_groups
from tests.test_structured import _inits, _run, _save

OPTS = RunOptions(progress=False, seed=0, latency=False)


def _upsampling_head(rng) -> onnx.ModelProto:
    """Conv(3->8)-BN-Relu-Conv(8->6)+bias-Relu-ConvTranspose(6->2, k2, s2)+bias: the first group has a Conv
    consumer, the second only the ConvTranspose."""
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(f), "c1.w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn.s"),
             numpy_helper.from_array(rng.normal(size=8).astype(f), "bn.b"),
             numpy_helper.from_array(rng.normal(size=8).astype(f), "bn.m"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn.v"),
             numpy_helper.from_array(rng.normal(size=(6, 8, 3, 3)).astype(f), "c2.w"),
             numpy_helper.from_array(rng.normal(size=6).astype(f), "c2.b"),
             numpy_helper.from_array(rng.normal(size=(6, 2, 2, 2)).astype(f), "up.w"),
             numpy_helper.from_array(rng.normal(size=2).astype(f), "up.b")]
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r2"], name="relu2"),
             helper.make_node("ConvTranspose", ["r2", "up.w", "up.b"], ["y"], name="up", strides=[2, 2])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture()
def head(tmp_path):
    rng = np.random.default_rng(4)
    path = _save(_upsampling_head(rng), tmp_path / "head.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 3, 6, 6)).astype(np.float32))
    return {"model": path, "calib": tmp_path / "calib.npz", "x": rng.normal(size=(5, 3, 6, 6)).astype(np.float32)}


def test_magnitude_shrinks_the_transposed_conv_rows_and_equals_the_zeroed_reference(head):
    groups = {g.producer: g for g in find_groups(onnx.load(head["model"]), "channels").groups}
    assert sorted(groups) == ["c1.w", "c2.w"] and groups["c2.w"].consumers == ()
    assert [(s.name, s.axis, s.role) for s in groups["c2.w"].slices][-1] == ("up.w", 0, "transposed-conv input weight")
    rep = compress(head["model"], MagnitudeConfig(sparsity=0.5, structure="channels"), head["calib"], options=OPTS)
    new = _inits(rep.model)
    assert new["up.w"].shape == (3, 2, 2, 2) and new["up.b"].shape == (2,) and new["c2.w"].shape == (3, 4, 3, 3)
    assert rep["structure"]["tensor_shapes"]["up.w"] == {"before": [6, 2, 2, 2], "after": [3, 2, 2, 2]}
    # reference: the original with the removed channels' rows of every reader zeroed (c2's input channels of
    # conv1's removed channels, up's input rows of conv2's removed channels)
    removed = {g["producer"]: g["removed"] for g in rep["structure"]["groups"]}
    ref = onnx.load(head["model"])
    arrays = _inits(ref)
    arrays["c2.w"][:, removed["c1.w"]] = 0.0
    arrays["up.w"][removed["c2.w"]] = 0.0
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    np.testing.assert_allclose(_run(rep.model, head["x"]), _run(ref, head["x"]), rtol=1e-5, atol=1e-5)


def test_structured_obs_leaves_the_transposed_reader_group_whole_with_the_reason(head):
    rep = compress(head["model"], SparseGPTConfig(sparsity=0.5, structure="channels"), head["calib"], options=OPTS)
    assert [g["producer"] for g in rep["structure"]["groups"]] == ["c1.w"]
    (skip,) = rep["structure"]["skipped"]
    assert skip["producer"] == "c2.w" and "ConvTranspose weight up.w" in skip["reason"] and "-m magnitude" in skip["reason"]
    assert _inits(rep.model)["up.w"].shape == (6, 2, 2, 2)


def test_grouped_transposed_conv_is_refused_with_the_reason(tmp_path):
    model = _upsampling_head(np.random.default_rng(5))
    up = next(n for n in model.graph.node if n.name == "up")
    up.attribute.append(helper.make_attribute("group", 2))
    w = next(t for t in model.graph.initializer if t.name == "up.w")
    w.CopyFrom(numpy_helper.from_array(np.ones((6, 1, 2, 2), np.float32), "up.w"))
    skipped = {s.producer: s.reason for s in find_groups(model, "channels").skipped}
    assert "grouped transposed convolution" in skipped["c2.w"]
