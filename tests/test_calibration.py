"""Loading and strict validation of calibration data (fls_compress.io.calibration).

Models are built directly with onnx.helper so the tests are fast and the graph inputs are exactly
what each test needs; every error is checked for its type, its text and for being one line.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress.errors import InvalidDataError, InvalidOptionError
from fls_compress.io.calibration import CalibrationData, graph_input_specs, load_calibration
from fls_compress.io.synthesis import DEFAULT_DYNAMIC_DIM

FEATURES = 8
CLASSES = 5


def make_model(inputs: list[tuple[str, int, list]], n_classes: int = CLASSES) -> onnx.ModelProto:
    """A graph mapping every input to a [N, n_classes] "logits" output.

    Each input goes through MatMul with its own weight (integer inputs are Cast to float first);
    the products are summed into "logits".
    """
    rng = np.random.default_rng(0)
    nodes, inits, partial = [], [], []
    for i, (name, elem_type, shape) in enumerate(inputs):
        source = name
        if elem_type != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT))
            source = f"{name}_f"
        last = shape[-1]
        weight = rng.standard_normal((last, n_classes)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [source, f"W{i}"], [f"p{i}"]))
        partial.append(f"p{i}")
    if len(partial) == 1:
        nodes.append(helper.make_node("Identity", partial, ["logits"]))
    else:
        nodes.append(helper.make_node("Sum", partial, ["logits"]))
    graph = helper.make_graph(
        nodes,
        "calib_test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return make_model([("input", TensorProto.FLOAT, ["N", FEATURES])])


@pytest.fixture(scope="module")
def two_input_model() -> onnx.ModelProto:
    return make_model([("a", TensorProto.FLOAT, ["N", FEATURES]), ("b", TensorProto.FLOAT, ["N", 3])])


def data(n: int = 10, features: int = FEATURES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, features)).astype(np.float32)


def load_error(source, model, **kwargs) -> str:
    """Load ``source`` expecting InvalidDataError; return its (checked single-line) message."""
    with pytest.raises(InvalidDataError) as info:
        load_calibration(source, model, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ------------------------------------------------------------------------------------------------
# Valid data
# ------------------------------------------------------------------------------------------------
def test_npz_with_labels_is_loaded_and_float64_cast(tmp_path: Path, model: onnx.ModelProto) -> None:
    x = data(12).astype(np.float64)
    labels = np.arange(12) % CLASSES
    np.savez(tmp_path / "calib.npz", input=x, labels=labels)
    calib = load_calibration(tmp_path / "calib.npz", model)
    assert calib.num_samples == 12
    assert calib.inputs["input"].dtype == np.float32
    np.testing.assert_array_equal(calib.inputs["input"], x.astype(np.float32))
    assert calib.labels.dtype == np.int64
    np.testing.assert_array_equal(calib.labels, labels)
    assert calib.synthetic is False
    assert calib.source.endswith("calib.npz")


def test_single_npy_for_single_input_model(tmp_path: Path, model: onnx.ModelProto) -> None:
    x = data(7)
    np.save(tmp_path / "x.npy", x)
    calib = load_calibration(str(tmp_path / "x.npy"), model)
    np.testing.assert_array_equal(calib.inputs["input"], x)
    assert calib.labels is None


def test_npy_is_refused_for_multi_input_model(tmp_path: Path, two_input_model: onnx.ModelProto) -> None:
    np.save(tmp_path / "x.npy", data(4))
    message = load_error(tmp_path / "x.npy", two_input_model)
    assert "single-input model" in message and "'a', 'b'" in message


def test_directory_of_per_sample_npy_in_sorted_order(tmp_path: Path, model: onnx.ModelProto) -> None:
    x = data(3)
    # One sample per file (rank one below the input's); sorted order is 000, 001, 002.
    for i in (2, 0, 1):
        np.save(tmp_path / f"{i:03d}.npy", x[i])
    np.save(tmp_path / "labels.npy", np.array([4, 0, 2]))
    calib = load_calibration(tmp_path, model)
    np.testing.assert_array_equal(calib.inputs["input"], x)
    np.testing.assert_array_equal(calib.labels, [4, 0, 2])


def test_directory_of_npz_batches_and_samples(tmp_path: Path, two_input_model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random((5, FEATURES)).astype(np.float32), rng.random((5, 3)).astype(np.float32)
    np.savez(tmp_path / "part1.npz", a=a[4], b=b[4], labels=np.int64(3))  # a single sample
    np.savez(tmp_path / "part0.npz", a=a[:4], b=b[:4], labels=np.arange(4))  # a batch of 4
    calib = load_calibration(tmp_path, two_input_model)
    np.testing.assert_array_equal(calib.labels, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(calib.inputs["a"], a)
    np.testing.assert_array_equal(calib.inputs["b"], b)


def test_directory_of_input_named_npy(tmp_path: Path, two_input_model: onnx.ModelProto) -> None:
    np.save(tmp_path / "a.npy", data(6))
    np.save(tmp_path / "b.npy", data(6, 3))
    calib = load_calibration(tmp_path, two_input_model)
    assert calib.num_samples == 6 and list(calib.inputs) == ["a", "b"]


def test_separate_labels_file_overrides(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(4), labels=np.array([0, 0, 0, 0]))
    np.save(tmp_path / "y.npy", np.array([1, 2, 3, 4]))
    calib = load_calibration(tmp_path / "calib.npz", model, labels_path=tmp_path / "y.npy")
    np.testing.assert_array_equal(calib.labels, [1, 2, 3, 4])


def test_integer_data_for_integer_input(tmp_path: Path) -> None:
    model = make_model([("ids", TensorProto.INT64, ["N", 4])])
    np.savez(tmp_path / "ids.npz", ids=np.arange(8, dtype=np.int32).reshape(2, 4))
    calib = load_calibration(tmp_path / "ids.npz", model)
    assert calib.inputs["ids"].dtype == np.int64


def test_static_leading_one_accepts_any_count_and_batches_singly(tmp_path: Path) -> None:
    model = make_model([("input", TensorProto.FLOAT, [1, FEATURES])])
    np.savez(tmp_path / "calib.npz", input=data(5))
    calib = load_calibration(tmp_path / "calib.npz", model)
    assert calib.num_samples == 5 and calib.max_batch == 1
    assert [b["input"].shape for b in calib.batches(64)] == [(1, FEATURES)] * 5


# ------------------------------------------------------------------------------------------------
# Bad data
# ------------------------------------------------------------------------------------------------
def test_wrong_shape(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(10, FEATURES + 1))
    message = load_error(tmp_path / "calib.npz", model)
    expected = f"calib.npz: input 'input' has shape (10, {FEATURES + 1}); the model expects (N, {FEATURES})"
    assert message.endswith(expected)


def test_wrong_rank(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(10).reshape(10, 2, FEATURES // 2))
    message = load_error(tmp_path / "calib.npz", model)
    assert "input 'input' has shape (10, 2, 4) (rank 3)" in message and "expects (N, 8) (rank 2)" in message


def test_missing_input(tmp_path: Path, two_input_model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", a=data(4))
    message = load_error(tmp_path / "calib.npz", two_input_model)
    assert "calib.npz: input 'b' is missing" in message


def test_extra_array(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(4), mask=data(4))
    message = load_error(tmp_path / "calib.npz", model)
    assert "array 'mask' is not a model input" in message


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_values(tmp_path: Path, model: onnx.ModelProto, bad: float, word: str) -> None:
    x = data(4)
    x[1, 2] = bad
    x[3, 0] = bad
    np.savez(tmp_path / "calib.npz", input=x)
    message = load_error(tmp_path / "calib.npz", model)
    assert f"input 'input' contains 2 {word} value(s)" in message


def test_integer_data_for_float_input(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=np.zeros((4, FEATURES), dtype=np.uint8))
    message = load_error(tmp_path / "calib.npz", model)
    assert "input 'input' is uint8 data but the model expects float32" in message


def test_float_data_for_integer_input(tmp_path: Path) -> None:
    model = make_model([("ids", TensorProto.INT64, ["N", 4])])
    np.savez(tmp_path / "ids.npz", ids=np.zeros((2, 4)))
    message = load_error(tmp_path / "ids.npz", model)
    assert "input 'ids' is float64 data but the model expects integer int64" in message


def test_labels_wrong_length(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(10), labels=np.zeros(9, dtype=np.int64))
    assert "there are 9 labels for 10 samples" in load_error(tmp_path / "calib.npz", model)


def test_labels_out_of_range_and_float(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(3), labels=np.array([0, CLASSES, 1]))
    assert f"label {CLASSES} is out of range; the model has {CLASSES} classes" in load_error(
        tmp_path / "calib.npz", model
    )
    np.savez(tmp_path / "calib.npz", input=data(3), labels=np.array([0.0, 1.0, 1.0]))
    assert "labels are float64; expected integer class indices" in load_error(tmp_path / "calib.npz", model)


def test_separate_labels_file_errors_name_that_file(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=data(4))
    np.save(tmp_path / "y.npy", np.zeros((4, 2), dtype=np.int64))
    message = load_error(tmp_path / "calib.npz", model, labels_path=tmp_path / "y.npy")
    assert message.startswith(str(tmp_path / "y.npy")) and "labels have shape (4, 2)" in message


def test_inconsistent_sample_counts(tmp_path: Path, two_input_model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", a=data(4), b=data(5, 3))
    assert "input 'a' has 4 samples but input 'b' has 5" in load_error(tmp_path / "calib.npz", two_input_model)


def test_empty_npz(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "empty.npz")
    assert "empty.npz: the .npz file contains no arrays" in load_error(tmp_path / "empty.npz", model)


def test_zero_samples(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=np.zeros((0, FEATURES), dtype=np.float32))
    assert "the data holds 0 samples" in load_error(tmp_path / "calib.npz", model)


def test_corrupt_npz(tmp_path: Path, model: onnx.ModelProto) -> None:
    (tmp_path / "calib.npz").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    assert "calib.npz: not a readable .npz file" in load_error(tmp_path / "calib.npz", model)


def test_garbage_files_are_not_mistaken_for_pickles(tmp_path: Path, model: onnx.ModelProto) -> None:
    (tmp_path / "calib.npz").write_bytes(b"\x00garbage" * 10)
    assert "calib.npz: not a readable .npz file (unrecognised file header)" in load_error(tmp_path / "calib.npz", model)
    (tmp_path / "x.npy").write_bytes(b"\x00garbage" * 10)
    assert "x.npy: not a readable .npy file" in load_error(tmp_path / "x.npy", model)
    np.save(tmp_path / "x.npy", data(2))
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:150])  # truncated
    assert "x.npy: not a readable .npy file" in load_error(tmp_path / "x.npy", model)


def test_pickled_object_array(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.savez(tmp_path / "calib.npz", input=np.array([{"a": 1}], dtype=object))
    assert "object arrays" in load_error(tmp_path / "calib.npz", model)


def test_directory_without_usable_files(tmp_path: Path, model: onnx.ModelProto) -> None:
    (tmp_path / "notes.txt").write_text("nothing to see")
    assert "directory contains no .npz or .npy files" in load_error(tmp_path, model)


def test_directory_with_disagreeing_files(tmp_path: Path, model: onnx.ModelProto) -> None:
    np.save(tmp_path / "0.npy", data(2))
    np.save(tmp_path / "1.npy", data(2, FEATURES + 1))
    assert "files disagree on the shape of 'input'" in load_error(tmp_path, model)


def test_missing_path_and_unknown_suffix(tmp_path: Path, model: onnx.ModelProto) -> None:
    assert "does not exist" in load_error(tmp_path / "nope.npz", model)
    (tmp_path / "data.csv").write_text("1,2,3")
    assert "unsupported data file type '.csv'" in load_error(tmp_path / "data.csv", model)


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------
def test_synthetic_data_follows_graph_and_warns(model: onnx.ModelProto, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fls_compress.io.calibration"):
        calib = load_calibration(None, model, num_synthetic=300, seed=3)
    assert calib.synthetic and calib.labels is None and calib.source == "synthetic"
    x = calib.inputs["input"]
    assert x.shape == (300, FEATURES) and x.dtype == np.float32
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1
    assert any("synthetic" in r.getMessage() and "rough" in r.getMessage() for r in caplog.records)
    again = load_calibration(None, model, num_synthetic=300, seed=3)
    np.testing.assert_array_equal(again.inputs["input"], x)


def test_synthetic_dynamic_dims_default_or_take_the_given_shape(caplog: pytest.LogCaptureFixture) -> None:
    dynamic = make_model([("input", TensorProto.FLOAT, ["N", "L", FEATURES])])
    with caplog.at_level(logging.WARNING, logger="fls_compress.io.synthesis"):
        calib = load_calibration(None, dynamic, num_synthetic=3)
    assert calib.inputs["input"].shape == (3, DEFAULT_DYNAMIC_DIM, FEATURES)
    assert calib.synthetic_shapes == {"input": [3, DEFAULT_DYNAMIC_DIM, FEATURES]}
    assert calib.defaulted_dims == {"input": [1]}
    assert any("dynamic dimension(s) at axis 1" in r.getMessage() for r in caplog.records)
    given = load_calibration(None, dynamic, num_synthetic=3, shapes={"input": (1, 5, FEATURES)})
    assert given.inputs["input"].shape == (3, 5, FEATURES) and given.defaulted_dims == {}
    with pytest.raises(InvalidOptionError, match="disagrees with the model"):
        load_calibration(None, dynamic, shapes={"input": (1, 5, FEATURES + 1)})
    with pytest.raises(InvalidOptionError, match="not a model input"):
        load_calibration(None, dynamic, shapes={"nope": (1, 5, FEATURES)})
    ids = make_model([("ids", TensorProto.INT64, ["N", 4])])
    with pytest.raises(InvalidDataError, match="only be generated for float inputs"):
        load_calibration(None, ids)


def _paddle_style_model() -> onnx.ModelProto:
    """[-1, 3, ?, ?] input (dim_value -1, unknown dims) -> GlobalAveragePool -> Flatten -> MatMul."""
    weight = numpy_helper.from_array(np.arange(3 * CLASSES, dtype=np.float32).reshape(3, CLASSES), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, None, None])
    x.type.tensor_type.shape.dim[2].ClearField("dim_param")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "paddle", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, CLASSES])], [weight]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_minus_one_and_unknown_dims_accept_any_size(tmp_path: Path) -> None:
    model = _paddle_style_model()
    arr = np.random.default_rng(0).random((6, 3, 48, 192)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=arr)
    calib = load_calibration(tmp_path / "d.npz", model)
    np.testing.assert_array_equal(calib.inputs["x"], arr)
    assert [s.shape for s in graph_input_specs(model)] == [(None, 3, None, None)]
    with pytest.raises(InvalidDataError, match="--shape gives"):
        load_calibration(tmp_path / "d.npz", model, shapes={"x": (1, 3, 48, 100)})


def _scalar_input_model() -> onnx.ModelProto:
    """logits = (x @ W) * sr: a rank-0 float input 'sr' shared by all samples."""
    weight = numpy_helper.from_array(np.ones((FEATURES, CLASSES), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "sr"], ["logits"])]
    graph = helper.make_graph(
        nodes,
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [weight],
    )
    graph.node.insert(1, helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT))
    graph.node[2].input[1] = "srf"
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rank0_input_from_npz_scalar_or_consts(tmp_path: Path) -> None:
    model = _scalar_input_model()
    x = data(6)
    np.savez(tmp_path / "d.npz", x=x, sr=np.int64(16000))
    calib = load_calibration(tmp_path / "d.npz", model)
    assert calib.num_samples == 6 and calib.constants["sr"].shape == () and int(calib.constants["sr"]) == 16000
    batch = next(calib.batches(4))
    assert batch["x"].shape == (4, FEATURES) and int(batch["sr"]) == 16000
    override = load_calibration(tmp_path / "d.npz", model, consts={"sr": 8000})
    assert int(override.constants["sr"]) == 8000
    _, holdout = calib.split(0.5)
    assert int(holdout.constants["sr"]) == 16000
    np.savez(tmp_path / "x.npz", x=x)
    assert "--const sr=VALUE" in load_error(tmp_path / "x.npz", model)
    assert "cannot be guessed" in load_error(None, model)
    synthetic = load_calibration(None, model, consts={"sr": 16000.0}, num_synthetic=4)
    assert synthetic.constants["sr"].dtype == np.int64 and synthetic.inputs["x"].shape == (4, FEATURES)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, next(synthetic.batches(4)))[0]
    np.testing.assert_allclose(out, synthetic.inputs["x"].sum(1, keepdims=True).repeat(CLASSES, 1) * 16000, rtol=1e-5)
    with pytest.raises(InvalidOptionError, match="not a scalar"):
        load_calibration(tmp_path / "d.npz", model, consts={"x": 1})
    np.savez(tmp_path / "bad.npz", x=x, sr=np.array([1, 2]))
    assert "differing values" in load_error(tmp_path / "bad.npz", model)


def _embedding_model(vocab: int = 10) -> onnx.ModelProto:
    table = numpy_helper.from_array(np.random.default_rng(0).random((vocab, 4)).astype(np.float32), "emb")
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [table, numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_token_ids_are_checked_against_the_embedding_table(tmp_path: Path) -> None:
    model = _embedding_model(vocab=10)
    np.savez(tmp_path / "ok.npz", ids=np.array([[0, 9, -10]], np.int64))
    assert load_calibration(tmp_path / "ok.npz", model).num_samples == 1
    np.savez(tmp_path / "bad.npz", ids=np.array([[0, 10]], np.int64))
    assert "index 10, outside the 10-row table" in load_error(tmp_path / "bad.npz", model)
    synthetic = load_calibration(None, model, num_synthetic=50, shapes={"ids": (1, 7)})
    ids = synthetic.inputs["ids"]
    assert ids.shape == (50, 7) and ids.dtype == np.int64 and ids.min() >= 0 and ids.max() <= 9


def test_fp16_and_float64_inputs_get_the_model_dtype(tmp_path: Path) -> None:
    for elem, dtype in ((TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)):
        model = make_model([("input", elem, ["N", FEATURES])])
        np.savez(tmp_path / "d.npz", input=data(4))
        calib = load_calibration(tmp_path / "d.npz", model)
        assert calib.inputs["input"].dtype == dtype
        np.testing.assert_allclose(calib.inputs["input"].astype(np.float64), data(4), rtol=1e-3)
    np.savez(tmp_path / "big.npz", input=np.full((2, FEATURES), 1e6, np.float32))
    half = make_model([("input", TensorProto.FLOAT16, ["N", FEATURES])])
    assert "Inf" in load_error(tmp_path / "big.npz", half)


def test_graph_input_specs_skip_initializers() -> None:
    model = make_model([("input", TensorProto.FLOAT, ["N", FEATURES])])
    model.graph.input.append(helper.make_tensor_value_info("W0", TensorProto.FLOAT, [FEATURES, CLASSES]))
    assert [s.name for s in graph_input_specs(model)] == ["input"]


# ------------------------------------------------------------------------------------------------
# CalibrationData helpers
# ------------------------------------------------------------------------------------------------
def make_calib(n: int = 10) -> CalibrationData:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return CalibrationData({"input": x}, np.arange(n, dtype=np.int64), synthetic=False, source="mem")


def test_split_is_disjoint_complete_and_seeded() -> None:
    calib = make_calib(10)
    first, holdout = calib.split(0.3, seed=1)
    assert (first.num_samples, holdout.num_samples) == (7, 3)
    together = np.sort(np.concatenate([first.labels, holdout.labels]))
    np.testing.assert_array_equal(together, np.arange(10))
    # Inputs stay aligned with labels.
    np.testing.assert_array_equal(holdout.inputs["input"][:, 0], holdout.labels * 2)
    again, _ = calib.split(0.3, seed=1)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert calib.split(0.01)[1].num_samples == 1  # never empty
    with pytest.raises(InvalidOptionError, match="between 0 and 1"):
        calib.split(1.0)


def test_batches_cover_all_samples() -> None:
    calib = make_calib(10)
    sizes = [b["input"].shape[0] for b in calib.batches(4)]
    assert sizes == [4, 4, 2]
    shuffled = [lab for _, labels in calib.labeled_batches(3, shuffle=True, seed=5) for lab in labels]
    assert sorted(shuffled) == list(range(10)) and shuffled != list(range(10))
    replay = [lab for _, labels in calib.labeled_batches(3, shuffle=True, seed=5) for lab in labels]
    assert replay == shuffled
    with pytest.raises(InvalidOptionError):
        next(calib.batches(0))


def test_subset_takes_prefix() -> None:
    calib = make_calib(10)
    np.testing.assert_array_equal(calib.subset(3).labels, [0, 1, 2])
    assert calib.subset(50).num_samples == 10


def test_state_input_with_batch_on_axis_1(tmp_path: Path) -> None:
    """[2, batch, H] recurrent state next to [batch, F] data: samples live on axis 1 of the state."""
    weight = numpy_helper.from_array(np.ones((FEATURES, 3), np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("ReduceSum", ["state"], ["s"], axes=[0, 2], keepdims=0),
        helper.make_node("Unsqueeze", ["s"], ["s1"], axes=[1]),
        helper.make_node("Add", ["h", "s1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, FEATURES]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    assert [s.batch_axis for s in graph_input_specs(model)] == [0, 1]
    x = data(5)
    state = np.random.default_rng(1).random((2, 5, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, state=state)
    calib = load_calibration(tmp_path / "d.npz", model)
    assert calib.num_samples == 5 and calib.batch_axes == {"state": 1}
    np.testing.assert_array_equal(calib.inputs["state"], state.transpose(1, 0, 2))
    _, holdout = calib.split(0.4)
    feed = next(holdout.batches(10))
    assert feed["state"].shape == (2, 2, 4)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x.sum(1, keepdims=True) + state.sum(axis=(0, 2))[:, None]
    full = sess.run(None, next(calib.batches(5)))[0]
    np.testing.assert_allclose(full, np.repeat(expected, 3, axis=1), rtol=1e-5)
    synthetic = load_calibration(None, model, num_synthetic=3, shapes={"x": (1, FEATURES)})
    assert synthetic.inputs["state"].shape == (3, 2, 4) and next(synthetic.batches(3))["state"].shape == (2, 3, 4)
    assert synthetic.synthetic_shapes["state"] == [2, 3, 4]
