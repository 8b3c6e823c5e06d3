"""Model files a pipeline may feed: broken ones fail with exit 3/4 and one line, odd valid ones are pruned."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from . import harness as h

BROKEN = [
    ("empty", 3, "empty.onnx"),
    ("random", 3, "random.onnx"),
    ("truncated", 3, "truncated.onnx"),
    ("text", 3, "text.onnx"),
    ("tensorproto", 3, "tensorproto.onnx"),
    ("adir", 3, "directory"),
    ("checker", 3, "invalid onnx model"),
    ("noext", 3, "noext.onnx"),
    ("noweights", 4, "no prunable"),
]


@pytest.mark.parametrize("key, code, fragment", BROKEN, ids=[c[0] for c in BROKEN])
@pytest.mark.parametrize("method", ["magnitude", "fls"])
def test_broken_models_fail_cleanly_with_a_report(capsys, files, outdir, inputs_before, key, code, fragment, method):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    extra = h.MAGNITUDE if method == "magnitude" else h.FAST_FLS
    data = () if key == "noweights" else ("--data", files["calib"])
    res = h.cli(capsys, "prune", files[key], "-o", out, *data, "--report", rep, *extra)
    doc = h.check_failure(res, code, fragment, before=inputs_before, output=out, report=rep, report_expected=True)
    assert doc["error_class"] in ("InvalidModelError", "UnsupportedModelError")


def test_missing_model_file(capsys, files, outdir, inputs_before):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["dir"] / "absent.onnx", "-o", out, "--report", rep, *h.MAGNITUDE)
    h.check_failure(res, 3, "not found", before=inputs_before, output=out, report=rep, report_expected=True)


def test_custom_domain_op_is_unsupported_for_torch_methods(capsys, files, outdir, inputs_before):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["custom"], "-o", out, "--report", rep, *h.FAST_FLS)
    h.check_failure(res, 4, "Frobnicate", before=inputs_before, output=out, report=rep, report_expected=True)


def test_custom_domain_op_that_onnxruntime_cannot_run(capsys, files, outdir, inputs_before):
    """Magnitude needs no runtime, but verification does: onnxruntime has no kernel -> unsupported (4)."""
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["custom"], "-o", out, "--report", rep, *h.MAGNITUDE)
    h.check_failure(res, 4, "Frobnicate", before=inputs_before, output=out, report=rep, report_expected=True)


VALID = [
    ("batch1", "calib", ("x",)),
    ("multi", "multi_data", ("sum", "act")),
    ("unicode", "calib", ("logits",)),
    ("ext", "calib", ("logits",)),
]


@pytest.mark.parametrize("key, data, outputs", VALID, ids=[c[0] for c in VALID])
@pytest.mark.parametrize("method", ["magnitude", "fls"])
def test_valid_odd_models_are_pruned(capsys, files, outdir, inputs_before, key, data, outputs, method):
    out = outdir / "pruned model ✓.onnx"
    extra = h.MAGNITUDE if method == "magnitude" else h.FAST_FLS
    res = h.cli(capsys, "prune", files[key], "-o", out, "--data", files[data], "-s", "0.5", *extra)
    doc = h.check_success(res, out, inputs_before)
    assert doc["sparsity"]["achieved"] >= 0.5
    if key != "batch1":
        assert sorted(doc["verification"]["outputs"]) == sorted(outputs)


@pytest.mark.parametrize("dtype, data", [(np.float16, "calib_fp16"), (np.float64, "calib_fp64")], ids=["fp16", "fp64"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_fp16_and_fp64_weights_keep_their_dtype(capsys, files, outdir, inputs_before, dtype, data, method):
    key = "fp16" if dtype == np.float16 else "fp64"
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", files[key], "-o", out, "--data", files[data], "-s", "0.5", "-m", method, "--no-progress")
    doc = h.check_success(res, out, inputs_before)
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    assert pruned["w1"].dtype == dtype and pruned["w2"].dtype == dtype
    assert doc["sparsity"]["achieved"] >= 0.5
    np.testing.assert_array_equal(pruned["b1"], numpy_helper.to_array(onnx.load(files[key]).graph.initializer[1]))


@pytest.mark.parametrize("key, data", [("fp16", "calib_fp16"), ("fp64", "calib_fp64")])
def test_fp16_and_fp64_models_with_fls(capsys, files, outdir, inputs_before, key, data):
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", files[key], "-o", out, "--data", files[data], "-s", "0.5", *h.FAST_FLS)
    h.check_success(res, out, inputs_before)


@pytest.mark.parametrize("method", ["magnitude", "fls", "sparsegpt"])
def test_integer_token_inputs(capsys, files, outdir, inputs_before, method):
    out = outdir / "o.onnx"
    extra = h.FAST_FLS if method == "fls" else ("-m", method, "--no-progress")
    res = h.cli(capsys, "prune", files["embed"], "-o", out, "--data", files["ids"], "-s", "0.5", *extra)
    doc = h.check_success(res, out, inputs_before)
    assert list(doc["sparsity"]["per_layer"]) == ["w"]  # the embedding table is not a prunable weight


def test_inputs_that_overflow_the_model_are_bad_data(capsys, files, outdir, tmp_path, inputs_before):
    """Finite but huge inputs overflow float32 inside the model: refused as bad data (exit 5) before any
    work, since there is nothing to fit a curvature to or to verify against."""
    huge = tmp_path / "huge.npz"
    np.savez(huge, x=np.full((16, 16), 3e38, np.float32))
    out, rep = outdir / "o.onnx", outdir / "r.json"
    for method in (h.MAGNITUDE, h.FAST_FLS):
        res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", huge, "--eval-data", huge, "--report", rep, *method)
        doc = h.check_failure(res, 5, "not finite", before=inputs_before, output=out, report=rep, report_expected=True)
        assert doc["calibration"]["num_samples"] == 16  # the data was read, the model was never compressed
        assert "verification" not in doc


def test_non_finite_verification_fails_like_a_gate():
    """The backstop for a compressed model whose outputs overflow: a report holding NaN/Inf is exit 6."""
    from fls_compress.gates import non_finite_outputs

    ok = {"outputs": {"y": {"max_abs_error": 0.5, "cosine_similarity": 0.9, "shape": [3]}}}
    bad = {"outputs": {"y": {"max_abs_error": 0.5, "cosine_similarity": float("nan")}}}
    assert non_finite_outputs(ok) is None
    assert "output 'y' is not finite" in non_finite_outputs(bad)


def test_identically_zero_outputs(capsys, files, tmp_path, outdir, inputs_before):
    """A model whose output is all zeros: relative errors are undefined, the report is still strict JSON."""
    model = h.mlp()
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((32, 4), np.float32), "w2"))
    path = tmp_path / "zero.onnx"
    onnx.save(model, path)
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", path, "-o", out, "--data", files["calib"], *h.MAGNITUDE)
    doc = h.check_success(res, out, inputs_before)
    assert doc["verification"]["outputs"]["logits"]["max_abs_error"] == 0.0


def _structural(name: str) -> onnx.ModelProto:
    """The classifier with one defect the ONNX checker does not see but onnxruntime (or pruning) would."""
    m = h.mlp()
    init = {t.name: t for t in m.graph.initializer}
    if name == "inner-dim-mismatch":
        init["w1"].CopyFrom(numpy_helper.from_array(np.ones((15, 32), np.float32), "w1"))
    elif name == "rank3-weight":
        init["w1"].CopyFrom(numpy_helper.from_array(np.ones((16, 32, 1), np.float32), "w1"))
    elif name == "int8-weight":
        init["w1"].CopyFrom(numpy_helper.from_array(np.ones((16, 32), np.int8), "w1"))
    elif name == "nan-weight":
        init["w1"].CopyFrom(numpy_helper.from_array(np.full((16, 32), np.nan, np.float32), "w1"))
    elif name == "inf-weight":
        w = numpy_helper.to_array(init["w2"]).copy()
        w[0, 0] = np.inf
        init["w2"].CopyFrom(numpy_helper.from_array(w, "w2"))
    elif name == "duplicate-node-names":
        m.graph.node[0].name = m.graph.node[1].name = "same"
    elif name == "declared-input-dim-wrong":
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 17
    elif name == "payload-size-wrong":
        init["w1"].dims[0] = 11
    return m


STRUCTURAL = ["inner-dim-mismatch", "rank3-weight", "int8-weight", "nan-weight", "inf-weight", "duplicate-node-names",
              "declared-input-dim-wrong", "payload-size-wrong"]


@pytest.mark.parametrize("defect", STRUCTURAL)
@pytest.mark.parametrize("method", ["magnitude", "fls", "sparsegpt"])
def test_defects_the_checker_misses_are_exit_3_before_any_work(capsys, files, tmp_path, outdir, inputs_before, defect, method):
    path = tmp_path / f"{defect}.onnx"
    onnx.save(_structural(defect), path)
    out, rep = outdir / "o.onnx", outdir / "r.json"
    extra = {"magnitude": h.MAGNITUDE, "fls": h.FAST_FLS, "sparsegpt": ("-m", "sparsegpt", "--no-progress")}[method]
    res = h.cli(capsys, "prune", path, "-o", out, "--data", files["calib"], "--report", rep, *extra)
    doc = h.check_failure(res, 3, "", before=inputs_before, output=out, report=rep, report_expected=True)
    assert doc["error_class"] == "InvalidModelError"
    assert "calibration" not in doc and "timing_s" in doc  # refused before the data was read


def test_weights_listed_as_graph_inputs_are_still_pruned(capsys, files, tmp_path, outdir, inputs_before):
    """Old exporters list initializers among the graph inputs too; they are weights, not data inputs."""
    m = h.mlp()
    m.graph.input.append(onnx.helper.make_tensor_value_info("w1", onnx.TensorProto.FLOAT, [16, 32]))
    path = tmp_path / "inputs.onnx"
    onnx.save(m, path)
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", path, "-o", out, "--data", files["calib"], "-s", "0.5", *h.MAGNITUDE)
    doc = h.check_success(res, out, inputs_before)
    assert doc["sparsity"]["achieved"] >= 0.5 and doc["sparsity"]["per_layer"]["w1"]["sparsity"] > 0.3


def _with(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
    return model


def test_absurdly_scaled_weights_are_one_line_not_a_crash(capsys, files, tmp_path, outdir, inputs_before):
    """Finite weights of 1e34 (found by the mutation fuzzer) make the Kronecker factors impossible to
    eigendecompose: exit 4 with one line instead of an internal error."""
    w1 = numpy_helper.to_array(h.mlp().graph.initializer[0]).copy()
    w1[0, 0], w1[3, 5] = 1.7e34, -2e34
    path = tmp_path / "huge_weights.onnx"
    onnx.save(_with(h.mlp(), "w1", w1), path)
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", path, "-o", out, "--data", files["calib"], "--report", rep, *h.FAST_FLS)
    h.check_failure(res, 4, "could not be factorised", before=inputs_before, output=out, report=rep, report_expected=True)


@pytest.mark.parametrize("name", ["fc\\2", "fc'2", 'fc"2', "fc\x022"])
def test_node_name_fx_cannot_emit(capsys, files, tmp_path, outdir, inputs_before, name):
    """Backslashes, quotes and control characters in node names (legal in ONNX) convert and prune."""
    m = h.mlp()
    m.graph.node[3].name = name
    path = tmp_path / "backslash.onnx"
    onnx.save(m, path)
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", path, "-o", out, "--data", files["calib"], *h.FAST_FLS)
    h.check_success(res, out, inputs_before)
