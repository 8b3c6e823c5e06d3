"""Tests of fls_compress.io.onnx_model: loading, prunable-site discovery, write-back, saving."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress.errors import InvalidModelError, InvalidOptionError
from fls_compress.io.onnx_model import (
    densify_sparse_initializers,
    ensure_distinct_paths,
    load_onnx,
    model_size_bytes,
    prunable_initializers,
    prunable_sites,
    read_initializer_arrays,
    read_weight,
    save_onnx_atomic,
    sparse_bytes_saved,
    weight_sparsity,
    write_back,
)

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _mlp(hidden: int = 64, float_data: bool = False) -> onnx.ModelProto:
    """X[4,16] -> MatMul W1 -> Add b1 -> Relu -> Gemm(W2, b2) -> Y[4,8], with metadata everywhere."""
    w1 = RNG.standard_normal((16, hidden)).astype(np.float32)
    b1 = RNG.standard_normal(hidden).astype(np.float32)
    w2 = RNG.standard_normal((8, hidden)).astype(np.float32)
    b2 = RNG.standard_normal(8).astype(np.float32)
    if float_data:
        w1_t = helper.make_tensor("W1", TensorProto.FLOAT, w1.shape, w1.reshape(-1).tolist(), raw=False)
    else:
        w1_t = numpy_helper.from_array(w1, "W1")
    w1_t.doc_string = "first projection"
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h"], name="mm1", doc_string="x @ w1"),
        helper.make_node("Add", ["h", "B1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["Y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 8])],
        initializer=[w1_t, numpy_helper.from_array(b1, "B1"), numpy_helper.from_array(w2, "W2"),
                     numpy_helper.from_array(b2, "B2")],
        doc_string="graph doc",
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="unit-test", producer_version="9.9"
    )
    model.ir_version = 9
    model.doc_string = "model doc"
    helper.set_model_props(model, {"author": "tests", "license": "none"})
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# ------------------------------------------------------------------------------------------------
# load_onnx
# ------------------------------------------------------------------------------------------------
def test_load_missing_directory_empty_corrupt_and_invalid(tmp_path: Path) -> None:
    cases = {
        "missing": tmp_path / "missing.onnx",
        "dir": tmp_path,
        "empty": tmp_path / "empty.onnx",
        "corrupt": tmp_path / "corrupt.onnx",
        "invalid": tmp_path / "invalid.onnx",
    }
    cases["empty"].write_bytes(b"")
    cases["corrupt"].write_bytes(b"\xff\xfe not a protobuf at all \x00\x01" * 10)
    bad = _mlp()
    bad.graph.node[0].input[1] = "does_not_exist"
    _save(bad, cases["invalid"])
    for path in cases.values():
        with pytest.raises(InvalidModelError) as info:
            load_onnx(path)
        message = str(info.value)
        assert path.name in message
        assert "\n" not in message


def test_load_valid_and_external_data(tmp_path: Path) -> None:
    model = _mlp()
    path = _save(model, tmp_path / "m.onnx")
    loaded = load_onnx(path)
    assert loaded.SerializeToString() == model.SerializeToString()

    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    ext_model = onnx.ModelProto()
    ext_model.CopyFrom(model)  # save_model externalizes the proto it is given in place
    onnx.save_model(ext_model, str(ext_dir / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0)
    assert (ext_dir / "m.bin").stat().st_size > 0
    ext = load_onnx(ext_dir / "m.onnx")
    np.testing.assert_array_equal(read_initializer_arrays(ext)["W1"], read_initializer_arrays(model)["W1"])

    # write-back of an external-data model stores the new tensor inline
    new_w1 = np.zeros((16, 64), np.float32)
    out = write_back(ext, {"W1": new_w1})
    w1 = next(t for t in out.graph.initializer if t.name == "W1")
    assert len(w1.external_data) == 0 and w1.data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(w1), new_w1)


# ------------------------------------------------------------------------------------------------
# prunable_initializers
# ------------------------------------------------------------------------------------------------
def test_prunable_initializers_selects_weights_only() -> None:
    f32 = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "conv_b"),
        numpy_helper.from_array(RNG.standard_normal((8, 10)).astype(np.float32), "mm_right"),
        numpy_helper.from_array(RNG.standard_normal((5, 4)).astype(np.float32), "mm_left"),
        numpy_helper.from_array(np.ones((8, 10), np.int8), "int8_w"),
        numpy_helper.from_array(RNG.standard_normal((10, 6)).astype(np.float32), "wrapped"),
        numpy_helper.from_array(np.ones(6, np.float32), "ln_scale"),
        numpy_helper.from_array(RNG.standard_normal((6, 3)).astype(np.float32), "gemm_b"),
        numpy_helper.from_array(np.ones((2, 2), np.float32), "c1"),
        numpy_helper.from_array(np.ones((2, 2), np.float32), "c2"),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "conv_w", "conv_b"], ["c"], name="conv"),
        helper.make_node("MatMul", ["x", "mm_right"], ["m1"], name="right"),
        helper.make_node("MatMul", ["mm_left", "cols"], ["m2"], name=""),
        helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT8),
        helper.make_node("MatMulInteger", ["xi", "int8_w"], ["mi"], name="mmint"),
        helper.make_node("Identity", ["wrapped"], ["wrapped_id"], name="id"),
        helper.make_node("MatMul", ["m1", "wrapped_id"], ["m3"], name="through_identity"),
        helper.make_node("LayerNormalization", ["m3", "ln_scale"], ["ln"], name="ln"),
        helper.make_node("Gemm", ["ln", "gemm_b"], ["g"], name="gemm"),
        helper.make_node("MatMul", ["c1", "c2"], ["cc"], name="const_const"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("img", f32, [1, 3, 8, 8]),
            helper.make_tensor_value_info("x", f32, [2, 8]),
            helper.make_tensor_value_info("cols", f32, [4, 7]),
        ],
        [helper.make_tensor_value_info(n, f32, None) for n in ("c", "m2", "g", "cc")]
        + [helper.make_tensor_value_info("mi", TensorProto.INT32, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sites = prunable_initializers(model)
    summary = [(s.name, s.op_type, s.node_names, s.shape, s.input_index) for s in sites]
    assert summary == [
        ("conv_w", "Conv", ("conv",), (4, 3, 3, 3), 1),
        ("mm_right", "MatMul", ("right",), (8, 10), 1),
        ("mm_left", "MatMul", ("MatMul_2",), (5, 4), 0),
        ("wrapped", "MatMul", ("through_identity",), (10, 6), 1),
        ("gemm_b", "Gemm", ("gemm",), (6, 3), 1),
    ]
    assert [s.name for s in prunable_initializers(model, ops=("Conv",))] == ["conv_w"]
    with pytest.raises(InvalidOptionError):
        prunable_initializers(model, ops=("Add",))


def _constant_weights_model() -> onnx.ModelProto:
    """Every weight a ``Constant`` node, as paddle2onnx writes them: Conv kernel, bias, a MatMul
    weight read through Identity, and a Gemm B; metadata and doc strings to check they survive."""
    f32 = TensorProto.FLOAT
    rng = np.random.default_rng(1)

    def const(name: str, arr: np.ndarray, node_name: str) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=node_name, value=numpy_helper.from_array(arr, ""))

    nodes = [
        const("conv_w", rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "p2o.Constant.0"),
        const("conv_b", rng.standard_normal(4).astype(np.float32), "p2o.Constant.1"),
        const("mm_w", rng.standard_normal((16, 6)).astype(np.float32), "p2o.Constant.2"),
        const("gemm_w", rng.standard_normal((5, 6)).astype(np.float32), ""),
        const("shape", np.array([0, -1], np.int64), "p2o.Constant.4"),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
        helper.make_node("Tile", ["f", "reps"], ["t"], name="tile"),
        helper.make_node("Identity", ["mm_w"], ["mm_w_id"], name="id"),
        helper.make_node("MatMul", ["t", "mm_w_id"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "gemm_w"], ["y"], name="fc", transB=1),
    ]
    nodes.insert(4, helper.make_node("Constant", [], ["reps"], name="p2o.Constant.5",
                                     value=numpy_helper.from_array(np.array([1, 4], np.int64), "")))
    graph = helper.make_graph(
        nodes, "paddle", [helper.make_tensor_value_info("x", f32, [-1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", f32, [-1, 5])], doc_string="pd",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="PaddlePaddle")
    helper.set_model_props(model, {"framework": "paddle"})
    onnx.checker.check_model(model)
    return model


def test_constant_node_weights_are_sites_and_written_back_into_the_same_node() -> None:
    model = _constant_weights_model()
    sites = prunable_sites(model)
    summary = [(s.name, s.op_type, s.storage, s.constant_node, s.node_names, s.shape, s.dtype) for s in sites]
    assert summary == [
        ("conv_w", "Conv", "constant", "p2o.Constant.0", ("conv",), (4, 2, 3, 3), "float32"),
        ("mm_w", "MatMul", "constant", "p2o.Constant.2", ("mm",), (16, 6), "float32"),
        ("gemm_w", "Gemm", "constant", "Constant_3", ("fc",), (5, 6), "float32"),
    ]
    before = model.SerializeToString()
    arrays = {s.name: read_weight(model, s.name).copy() for s in sites}
    for arr in arrays.values():
        arr.reshape(-1)[::2] = 0.0
    out = write_back(model, arrays)
    assert model.SerializeToString() == before

    # graph identity outside the rewritten tensors
    rewritten = {"p2o.Constant.0", "p2o.Constant.2", ""}
    assert len(out.graph.node) == len(model.graph.node)
    for new, old in zip(out.graph.node, model.graph.node):
        if new.op_type == "Constant" and new.name in rewritten and new.output[0] in arrays:
            assert (new.name, list(new.input), list(new.output), new.domain) == (old.name, list(old.input), list(old.output), old.domain)
            assert [a.name for a in new.attribute] == ["value"]
            assert (new.attribute[0].t.dims, new.attribute[0].t.data_type) == (old.attribute[0].t.dims, old.attribute[0].t.data_type)
            np.testing.assert_array_equal(numpy_helper.to_array(new.attribute[0].t), arrays[new.output[0]])
        else:
            assert new.SerializeToString() == old.SerializeToString()
    for field_name in ("input", "output", "initializer", "value_info"):
        assert getattr(out.graph, field_name) == getattr(model.graph, field_name)
    assert out.opset_import == model.opset_import and out.metadata_props == model.metadata_props
    assert (out.producer_name, out.ir_version, out.graph.name, out.graph.doc_string) == (
        model.producer_name, model.ir_version, model.graph.name, model.graph.doc_string)
    assert weight_sparsity(out, list(arrays)) == {n: 0.5 for n in arrays}

    onnx.checker.check_model(out, full_check=True)
    x = RNG.standard_normal((3, 2, 8, 8)).astype(np.float32)
    got = _run(out, {"x": x})[0]
    # reference: the same graph with every weight replaced as an initializer via the converter pass
    from fls_compress.bridge.prep import constants_to_initializers

    reference = write_back(constants_to_initializers(model), arrays)
    np.testing.assert_allclose(got, _run(reference, {"x": x})[0], rtol=1e-6)
    assert not np.allclose(got, _run(model, {"x": x})[0])


# ------------------------------------------------------------------------------------------------
# write_back
# ------------------------------------------------------------------------------------------------
def _strip(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i in reversed(range(len(copy.graph.initializer))):
        if copy.graph.initializer[i].name in names:
            del copy.graph.initializer[i]
    del copy.graph.sparse_initializer[:]
    return copy


@pytest.mark.parametrize("float_data", [False, True])
def test_write_back_changes_only_the_payload(float_data: bool) -> None:
    model = _mlp(float_data=float_data)
    before = model.SerializeToString()
    w1 = read_initializer_arrays(model)["W1"].copy()
    w1[:, ::2] = 0.0
    out = write_back(model, {"W1": w1})

    assert model.SerializeToString() == before  # the original is not modified
    assert _strip(out, {"W1"}).SerializeToString() == _strip(model, {"W1"}).SerializeToString()
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    assert out.metadata_props == model.metadata_props and out.producer_name == "unit-test"
    new_t = next(t for t in out.graph.initializer if t.name == "W1")
    old_t = next(t for t in model.graph.initializer if t.name == "W1")
    assert new_t.doc_string == old_t.doc_string == "first projection"
    assert list(new_t.dims) == list(old_t.dims) and new_t.data_type == old_t.data_type
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    np.testing.assert_array_equal(numpy_helper.to_array(new_t), w1)

    onnx.checker.check_model(out, full_check=True)
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    arrays = read_initializer_arrays(model)
    expected = np.maximum(x @ w1 + arrays["B1"], 0) @ arrays["W2"].T + arrays["B2"]
    np.testing.assert_allclose(_run(out, {"X": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_write_back_rejects_mismatches() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match="dtype"):
        write_back(model, {"W1": np.zeros((16, 64), np.float64)})
    with pytest.raises(ValueError, match="shape"):
        write_back(model, {"W1": np.zeros((64, 16), np.float32)})
    with pytest.raises(ValueError, match="no initializer"):
        write_back(model, {"nope": np.zeros(3, np.float32)})


def test_sparse_write_back_is_smaller_and_exact() -> None:
    model = _mlp(hidden=256)
    arrays = read_initializer_arrays(model)
    w1 = arrays["W1"].copy()
    w1.reshape(-1)[RNG.permutation(w1.size)[: int(0.9 * w1.size)]] = 0.0
    w2 = arrays["W2"].copy()
    w2.reshape(-1)[RNG.permutation(w2.size)[: int(0.1 * w2.size)]] = 0.0

    dense = write_back(model, {"W1": w1, "W2": w2})
    sparse = write_back(model, {"W1": w1, "W2": w2}, sparse=True)
    assert [s.values.name for s in sparse.graph.sparse_initializer] == ["W1"]  # 10% zeros: stays dense
    assert "W1" not in {t.name for t in sparse.graph.initializer}
    indices = sparse.graph.sparse_initializer[0].indices
    assert indices.data_type == TensorProto.INT64 and list(indices.dims) == [np.count_nonzero(w1)]
    assert np.all(np.diff(numpy_helper.to_array(indices)) > 0)

    saved = sparse_bytes_saved(sparse)
    assert saved > 0
    assert abs(model_size_bytes(dense) - model_size_bytes(sparse) - saved) <= 4  # varint framing
    dense_w1 = next(t for t in dense.graph.initializer if t.name == "W1")
    assert sparse.graph.sparse_initializer[0].ByteSize() < 0.31 * dense_w1.ByteSize()  # 10% of 12 B vs 4 B
    assert model_size_bytes(sparse) == len(sparse.SerializeToString())

    onnx.checker.check_model(sparse)
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(sparse, {"X": x})[0], _run(dense, {"X": x})[0])

    np.testing.assert_array_equal(read_initializer_arrays(sparse)["W1"], w1)
    sp = weight_sparsity(sparse, ["W1", "W2", "B1"])
    assert sp["W1"] == pytest.approx(0.9, abs=1e-3) and sp["W2"] == pytest.approx(0.1, abs=1e-2)
    assert sp["B1"] == 0.0
    densified = densify_sparse_initializers(sparse)
    assert len(densified.graph.sparse_initializer) == 0
    np.testing.assert_array_equal(read_initializer_arrays(densified)["W1"], w1)

    # writing back into an already-sparse initializer works too
    again = write_back(sparse, {"W1": np.zeros_like(w1)})
    np.testing.assert_array_equal(read_initializer_arrays(again)["W1"], 0.0)
    assert len(again.graph.sparse_initializer) == 0


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------
def test_save_atomic_and_input_untouched(tmp_path: Path) -> None:
    src = _save(_mlp(), tmp_path / "in.onnx")
    os.utime(src, (1_000_000_000, 1_000_000_000))
    src_bytes, src_mtime = src.read_bytes(), src.stat().st_mtime_ns

    model = load_onnx(src)
    out = write_back(model, {"W1": np.zeros((16, 64), np.float32)}, sparse=True)
    dst = tmp_path / "nested" / "deeper" / "out.onnx"
    ensure_distinct_paths(src, dst)
    save_onnx_atomic(out, dst)

    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.onnx"]
    assert load_onnx(dst).SerializeToString() == out.SerializeToString()
    assert src.read_bytes() == src_bytes and src.stat().st_mtime_ns == src_mtime

    save_onnx_atomic(model, dst)  # overwrite in place, still no leftovers
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.onnx"]

    with pytest.raises(InvalidOptionError):
        ensure_distinct_paths(src, src)
    with pytest.raises(InvalidOptionError):
        ensure_distinct_paths(src, tmp_path / "nested" / ".." / "in.onnx")


def test_save_atomic_external_data(tmp_path: Path) -> None:
    model = _mlp()
    dst = tmp_path / "big" / "model.onnx"
    save_onnx_atomic(model, dst, external_data_threshold=0)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert dst.stat().st_size < model_size_bytes(model)
    loaded = load_onnx(dst)
    for name, arr in read_initializer_arrays(model).items():
        np.testing.assert_array_equal(read_initializer_arrays(loaded)[name], arr)
    save_onnx_atomic(model, dst, external_data_threshold=0)  # the data file is replaced, not appended to
    assert (dst.parent / "model.onnx.data").stat().st_size < model_size_bytes(model)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_weights_inside_if_bodies_are_sites_on_request_and_written_back_there() -> None:
    f32 = TensorProto.FLOAT
    rng = np.random.default_rng(3)

    def body(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [name], name=f"{name}_mm")], name, [],
                                 [helper.make_tensor_value_info(name, f32, None)], [w])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="switch", then_branch=body("t"), else_branch=body("e"))], "g",
        [helper.make_tensor_value_info("x", f32, [2, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f32, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    assert prunable_sites(model) == []
    sites = prunable_sites(model, include_subgraphs=True)
    assert sorted((s.name, s.subgraph, s.node_names) for s in sites) == [  # bodies in attribute order
        ("e_w", "switch/else_branch", ("e_mm",)), ("t_w", "switch/then_branch", ("t_mm",))]
    new_t = np.zeros((4, 3), np.float32)
    out = write_back(model, {"t_w": new_t})
    np.testing.assert_array_equal(read_weight(out, "t_w"), new_t)
    np.testing.assert_array_equal(read_weight(out, "e_w"), read_weight(model, "e_w"))
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert not _run(out, {"x": x, "c": np.array(True)})[0].any()
    np.testing.assert_allclose(_run(out, {"x": x, "c": np.array(False)})[0], x @ read_weight(model, "e_w"), rtol=1e-5)
