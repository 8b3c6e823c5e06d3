"""Calibration, evaluation and label files a pipeline may feed: every bad one is exit 5 with one line.

Each case runs both a data-hungry method (FLS: torch graph) and one that needs only onnxruntime
activations (SparseGPT), because they read the data through different code paths.
"""

from __future__ import annotations

import pytest

from . import harness as h

# (option, file key, fragment of the error line)
BAD_DATA = [
    ("--data", "wrong_name", "'x'"),
    ("--data", "inf", "inf"),
    ("--data", "neginf", "inf"),
    ("--data", "zero", "0 sample"),
    ("--data", "one", "1 sample"),
    ("--data", "complex", "complex"),
    ("--data", "strings", "'x'"),
    ("--data", "bools", "bool"),
    ("--data", "rank3", "shape"),
    ("--data", "short_labels", "labels"),
    ("--data", "oob_labels", "label"),
    ("--data", "neg_labels", "negative"),
    ("--data", "float_labels", "labels"),
    ("--data", "labels_2d", "labels"),
    ("--data", "pickled", "pickle"),
    ("--data", "pickled_npy", "pickle"),
    ("--data", "garbage_npz", "garbage.npz"),
    ("--data", "empty_npz", "empty.npz"),
    ("--data", "nothing_npz", "no arrays"),
    ("--data", "x1d_npy", "shape"),
    ("--data", "empty_dir", "empty data dir"),
    ("--data", "mlp", "mlp.onnx"),
    ("--eval-data", "inf", "inf"),
    ("--eval-data", "wrong_name", "'x'"),
    ("--labels", "short_labels_npy", "labels"),
    ("--labels", "garbage_npz", "garbage.npz"),
    ("--weights", "garbage_st", "weights.safetensors"),
]


@pytest.mark.parametrize("option, key, fragment", BAD_DATA, ids=[f"{o[2:]}-{k}" for o, k, _ in BAD_DATA])
@pytest.mark.parametrize("method", ["fls", "sparsegpt"])
def test_bad_data_exit_5_with_a_report(capsys, files, outdir, inputs_before, option, key, fragment, method):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    data = () if option == "--data" else ("--data", files["calib" if option != "--labels" else "x_npy"])
    extra = h.FAST_FLS if method == "fls" else ("-m", "sparsegpt", "--no-progress")
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, option, files[key], *data, "--report", rep, *extra)
    doc = h.check_failure(res, 5, fragment, before=inputs_before, output=out, report=rep, report_expected=True)
    assert doc["error_class"] == "InvalidDataError"
    assert not files["pickle_marker"].exists(), "an object array was unpickled"


def test_missing_data_and_labels_files(capsys, files, outdir, inputs_before):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    for option in ("--data", "--eval-data", "--labels", "--weights"):
        base = () if option == "--data" else ("--data", files["x_npy"])
        res = h.cli(capsys, "prune", files["mlp"], "-o", out, option, files["dir"] / "absent.npz", *base,
                    "--report", rep, *h.MAGNITUDE)
        h.check_failure(res, 5, "absent.npz", before=inputs_before, output=out, report=rep, report_expected=True)


def test_one_calibration_sample_with_separate_eval_data(capsys, files, outdir, inputs_before):
    """One sample cannot be split into calibration and hold-out, but is enough with --eval-data."""
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["one"], "--eval-data", files["calib"], *h.FAST_FLS)
    doc = h.check_success(res, out, inputs_before)
    assert doc["calibration"]["num_samples"] == 1


def test_labels_file_for_npy_data(capsys, files, outdir, inputs_before):
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["x_npy"], "--labels", files["labels_npy"], *h.FAST_FLS)
    doc = h.check_success(res, out, inputs_before)
    assert doc["verification"]["outputs"]["logits"]["accuracy_original"] is not None


def test_data_for_another_model_is_refused(capsys, files, outdir, inputs_before):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["multi"], "-o", out, "--data", files["missing_input"], "--report", rep, *h.MAGNITUDE)
    h.check_failure(res, 5, "'b'", before=inputs_before, output=out, report=rep, report_expected=True)


@pytest.mark.parametrize("key", ["ids_oob", "ids_neg"])
def test_token_ids_outside_the_embedding_table(capsys, files, outdir, inputs_before, key):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["embed"], "-o", out, "--data", files[key], "--report", rep, *h.FAST_FLS)
    h.check_failure(res, 5, "outside", before=inputs_before, output=out, report=rep, report_expected=True)


def _corrupt_header(payload: bytes) -> bytes:
    """A .npy payload whose header dict no longer parses (unbalanced parenthesis, same length)."""
    start = payload.index(b"'shape': (")
    end = payload.index(b")", start)
    return payload[:end] + b"(" + payload[end + 1:]


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_corrupt_array_header_is_bad_data(capsys, files, tmp_path, outdir, inputs_before, kind):
    import io
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ones((64, 16), np.float32))
    member = _corrupt_header(buf.getvalue())
    path = tmp_path / f"corrupt.{kind}"
    if kind == "npy":
        path.write_bytes(member)
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("x.npy", member)
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", path, "--report", rep, *h.MAGNITUDE)
    h.check_failure(res, 5, f"corrupt.{kind}", before=inputs_before, output=out, report=rep, report_expected=True)
