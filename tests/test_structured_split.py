"""``--structure channels`` through a channel-axis Split (YOLOv8's C2f: ``cv1(x).split((c, c), 1)`` as the torch
legacy exporter writes it, constant sizes; ``chunk`` as the dynamo exporter writes it, ``num_outputs``): one
group per part, the Split sizes rewritten, equal to the zeroed reference; a residual chain that concatenates the
same channels twice leaves its part whole with the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress import compress
from fls_compress.configs import MagnitudeConfig, RunOptions, SparseGPTConfig
from fls_compress.structured.groups import consumer_slice, find_groups
from fls_compress.structured.rewrite import explicit_splits
from fls_compress.structured.walk import GraphIndex
from sample_models.c2f_net import C2fNet, export, randomize_batchnorm
from tests.test_structured import _inits, _run, _save

OPTS = RunOptions(progress=False, seed=0, latency=False)


def _export(tmp_path, shortcut: bool, dynamo: bool):
    net = randomize_batchnorm(C2fNet(shortcut, chunk=dynamo))
    path = export(net, tmp_path / "c2f.onnx", 16, dynamo)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(48, 3, 16, 16)).astype(np.float32))
    return path, tmp_path / "calib.npz", rng.normal(size=(5, 3, 16, 16)).astype(np.float32)


def _zeroed_reference(path, report) -> onnx.ModelProto:
    """The original with every reader's input columns of the removed channels set to zero."""
    model = onnx.load(str(path))
    explicit_splits(model)
    found = {g.key: g for g in find_groups(model, "channels").groups}
    arrays = _inits(model)
    for entry in report["structure"]["groups"]:
        for consumer in found[entry["producer"]].consumers:
            s = consumer_slice(model, consumer)
            view = np.moveaxis(arrays[s.name], s.axis, 0)
            view[s.offset + np.asarray(entry["removed"], dtype=np.int64)] = 0.0
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return model


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy-split", "dynamo-chunk"])
@pytest.mark.parametrize("shortcut", [False, True], ids=["neck", "backbone"])
def test_split_parts_are_groups_and_equal_the_zeroed_reference(tmp_path, dynamo, shortcut):
    path, calib, x = _export(tmp_path, shortcut, dynamo)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="channels"), calib, options=OPTS)
    s = rep["structure"]
    parts = {g["producer"]: g for g in s["groups"] if "part" in g}
    skipped = {k["producer"]: k["reason"] for k in s["skipped"]}
    weight = next(iter(parts.values()))["weight"]
    assert parts[f"{weight}#0"]["part"] == [0, 2] and parts[f"{weight}#0"]["kept"] == 4
    assert s["splits_made_explicit"] == (1 if dynamo else 0)
    split = next(n for n in rep.model.graph.node if n.op_type == "Split")
    sizes = GraphIndex(rep.model).const_value(split.input[1]).tolist()
    if shortcut:  # part 1 joins the concat again through every residual Add: left whole
        assert f"{weight}#1" not in parts and "reached twice" in skipped[f"{weight}#1"]
        assert sizes == [4, 8]
    else:
        assert parts[f"{weight}#1"]["kept"] == 4 and sizes == [4, 4]
        assert len(s["groups"]) == 8 and s["parameters"]["ratio"] < 0.3
    assert _inits(rep.model)[weight].shape[0] == sum(sizes)
    np.testing.assert_allclose(_run(rep.model, x), _run(_zeroed_reference(path, rep), x), rtol=1e-4, atol=1e-4)


def test_structured_obs_through_the_split_beats_magnitude(tmp_path):
    path, calib, x = _export(tmp_path, shortcut=False, dynamo=False)
    dense = _run(path, x)
    err = {}
    for cls in (MagnitudeConfig, SparseGPTConfig):
        rep = compress(path, cls(sparsity=0.5, structure="channels"), calib, options=OPTS)
        assert sum("part" in g for g in rep["structure"]["groups"]) == 2
        err[cls.method] = float(np.linalg.norm(_run(rep.model, x) - dense) / np.linalg.norm(dense))
    assert err["sparsegpt"] < 0.5 * err["magnitude"]


def _split_model(sizes_input: bool, axis: int = 1, channels: int = 10, parts: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(channels, 2, 1, 1)).astype(f), "c.w")]
    inputs = ["h"]
    if sizes_input:
        inits.append(numpy_helper.from_array(np.array([4, 4, 2], np.int64), "sizes"))
        inputs.append("sizes")
    outs = [f"p{k}" for k in range(parts)]
    kw = {} if sizes_input else {"num_outputs": parts}
    nodes = [helper.make_node("Conv", ["x", "c.w"], ["h"], name="conv"),
             helper.make_node("Split", inputs, outs, name="split", axis=axis, **kw)]
    nodes += [helper.make_node("ReduceSum", [o], [f"s{k}"], name=f"r{k}", keepdims=1) for k, o in enumerate(outs)]
    nodes.append(helper.make_node("Concat", [f"s{k}" for k in range(parts)], ["y"], name="cat", axis=0))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [parts, 1, 1, 1])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_num_outputs_splits_become_explicit_sizes_with_the_same_function(tmp_path):
    model = _split_model(sizes_input=False)
    x = np.random.default_rng(2).normal(size=(2, 2, 4, 4)).astype(np.float32)
    before = _run(_save(model, tmp_path / "a.onnx"), x)
    assert explicit_splits(model) == ["p0"]
    split = model.graph.node[1]
    assert [a.name for a in split.attribute] == ["axis"]
    assert numpy_helper.to_array(model.graph.initializer[-1]).tolist() == [4, 4, 2]  # ceil(10 / 3), the rest last
    np.testing.assert_array_equal(_run(_save(model, tmp_path / "b.onnx"), x), before)


def test_split_refusals_name_the_reason():
    reasons = [s.reason for s in find_groups(_split_model(sizes_input=True, axis=2, channels=10), "channels").skipped]
    assert any("splits another axis" in r for r in reasons)
    reasons = [s.reason for s in find_groups(_split_model(sizes_input=False), "channels").skipped]  # not made explicit
    assert any("no constant split sizes" in r for r in reasons)


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_shared_split_sizes_are_copied_per_split(tmp_path, as_constant_node):
    """The torch exporter shares equal constants (initializers, or Constant nodes in the legacy exporter): a
    Split whose sizes another Split also reads gets a copy, so that pruning one's parts leaves the other's
    sizes alone; the function is unchanged."""
    model = _split_model(sizes_input=True)
    if as_constant_node:
        sizes = model.graph.initializer.pop()
        model.graph.node.insert(0, helper.make_node("Constant", [], ["sizes"], name="sizes_const", value=sizes))
    first = next(n for n in model.graph.node if n.name == "split")
    second = helper.make_node("Split", ["h", "sizes"], ["q0", "q1", "q2"], name="split2", axis=1)
    model.graph.node.append(second)
    model.graph.node.append(helper.make_node("Concat", ["q0", "q2"], ["z"], name="cat2", axis=1))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 6, 4, 4]))
    x = np.random.default_rng(3).normal(size=(2, 2, 4, 4)).astype(np.float32)
    before = _run(_save(model, tmp_path / "a.onnx"), x)
    assert explicit_splits(model) == ["p0"]
    assert first.input[1] == "p0_split_sizes" and second.input[1] == "sizes"
    np.testing.assert_array_equal(_run(_save(model, tmp_path / "b.onnx"), x), before)
