"""onnxruntime verification of a compressed model against the original (fls_compress.verification).

Expected numbers are computed independently with numpy (float64) from the model weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fls_compress.errors import InvalidOptionError, VerificationError
from fls_compress.io.calibration import CalibrationData
from fls_compress.verification import summarize, verify_models

IN, HIDDEN, OUT = 8, 16, 5


def mlp(weights: dict[str, np.ndarray], *, out_name: str = "logits", metadata: dict[str, str] | None = None,
        batch: int | str = "N") -> onnx.ModelProto:
    """x [N, IN] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> out [N, OUT]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], [out_name]),
    ]
    out_dim = weights["W2"].shape[1]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, IN])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, out_dim])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(model)
    return model


def make_weights(out_dim: int = OUT, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((IN, HIDDEN)).astype(np.float32),
        "b1": rng.standard_normal(HIDDEN).astype(np.float32),
        "W2": rng.standard_normal((HIDDEN, out_dim)).astype(np.float32),
    }


def numpy_forward(weights: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and outputs in float64."""
    h = np.maximum(x.astype(np.float64) @ weights["W1"] + weights["b1"], 0.0)
    return h, h @ weights["W2"].astype(np.float64)


def make_data(n: int = 50, labels: bool = True, seed: int = 1) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = rng.random((n, IN)).astype(np.float32)
    y = rng.integers(0, OUT, n) if labels else None
    return CalibrationData({"x": x}, y, synthetic=False, source="test")


def test_identical_models_have_zero_error() -> None:
    weights = make_weights()
    model = mlp(weights)
    data = make_data()
    report = verify_models(model, mlp(weights), data)
    out = report["outputs"]["logits"]
    assert report["task"] == "classification"
    assert report["num_samples"] == 50
    assert out["shape"] == [OUT]
    assert out["max_abs_error"] == 0.0 and out["mean_abs_error"] == 0.0 and out["relative_l2_error"] == 0.0
    assert out["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert out["top1_agreement"] == 1.0
    _, logits = numpy_forward(weights, data.inputs["x"])
    expected_accuracy = float(np.mean(logits.argmax(axis=1) == data.labels))
    assert out["accuracy_original"] == out["accuracy_compressed"] == pytest.approx(expected_accuracy)
    sizes = report["model_size_bytes"]
    assert sizes["original"] == sizes["compressed"] == model.ByteSize() and sizes["ratio"] == 1.0
    json.dumps(report, allow_nan=False)


def test_perturbed_weight_gives_expected_errors() -> None:
    weights = make_weights()
    perturbed = {k: v.copy() for k, v in weights.items()}
    i, j, delta = 3, 2, np.float32(0.25)
    perturbed["W2"][i, j] += delta
    data = make_data(n=64)
    report = verify_models(mlp(weights), mlp(perturbed), data, batch_size=16)
    out = report["outputs"]["logits"]

    h, ref = numpy_forward(weights, data.inputs["x"])
    _, new = numpy_forward(perturbed, data.inputs["x"])
    diff = np.abs(new - ref)
    # Only column j moves, by delta * h[:, i].
    np.testing.assert_allclose(diff[:, j], float(delta) * h[:, i], rtol=1e-5, atol=1e-6)
    assert out["max_abs_error"] == pytest.approx(float(delta) * h[:, i].max(), rel=1e-4)
    assert out["mean_abs_error"] == pytest.approx(float(delta) * h[:, i].sum() / ref.size, rel=1e-4)
    assert out["relative_l2_error"] == pytest.approx(np.linalg.norm(new - ref) / np.linalg.norm(ref), rel=1e-4)
    cosine = (ref * new).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1))
    assert out["cosine_similarity"] == pytest.approx(cosine.mean(), rel=1e-6)
    assert out["cosine_similarity"] < 1.0
    agreement = float(np.mean(ref.argmax(1) == new.argmax(1)))
    assert out["top1_agreement"] == pytest.approx(agreement)
    assert out["accuracy_compressed"] == pytest.approx(float(np.mean(new.argmax(1) == data.labels)))
    assert out["max_abs_error"] > 0


def test_batch_size_does_not_change_the_report() -> None:
    weights = make_weights()
    perturbed = {k: v * np.float32(1.01) for k, v in weights.items()}
    data = make_data(n=37)
    small = verify_models(mlp(weights), mlp(perturbed), data, batch_size=5)["outputs"]["logits"]
    large = verify_models(mlp(weights), mlp(perturbed), data, batch_size=256)["outputs"]["logits"]
    for key in ("max_abs_error", "mean_abs_error", "relative_l2_error", "cosine_similarity", "top1_agreement"):
        assert small[key] == pytest.approx(large[key], rel=1e-5), key


def test_reconstruction_metrics_match_numpy(tmp_path: Path) -> None:
    weights = make_weights(out_dim=IN)
    perturbed = {k: v.copy() for k, v in weights.items()}
    perturbed["W2"][0, :] = 0.0
    meta = {"task": "reconstruction", "likelihood": "bernoulli"}
    original, compressed = mlp(weights, metadata=meta), mlp(perturbed, metadata=meta)
    onnx.save(original, tmp_path / "orig.onnx")
    data = make_data(n=40, labels=False)
    report = verify_models(str(tmp_path / "orig.onnx"), compressed, data)
    assert report["task"] == "reconstruction"
    out = report["outputs"]["logits"]
    x = data.inputs["x"].astype(np.float64)
    for suffix, w in (("original", weights), ("compressed", perturbed)):
        _, z = numpy_forward(w, x)
        p = 1.0 / (1.0 + np.exp(-z))
        nll = -(x * np.log(p) + (1.0 - x) * np.log1p(-p)).sum(axis=1).mean()
        assert out[f"bernoulli_nll_{suffix}"] == pytest.approx(nll, rel=1e-5)
        assert out[f"mse_{suffix}"] == pytest.approx(np.mean((p - x) ** 2), rel=1e-5)
    assert out["bernoulli_nll_compressed"] != out["bernoulli_nll_original"]
    assert "top1_agreement" not in out
    text = summarize(report)
    assert "task: reconstruction" in text and "Bernoulli NLL" in text
    assert f"{out['bernoulli_nll_original']:.3f} -> {out['bernoulli_nll_compressed']:.3f}" in text


def test_task_resolution_and_options() -> None:
    weights = make_weights(out_dim=1)
    model = mlp(weights, out_name="score")
    data = make_data(labels=False)
    assert verify_models(model, model, data)["task"] == "generic"
    with pytest.raises(InvalidOptionError, match="unknown task 'segmentation'"):
        verify_models(model, model, data, task="segmentation")
    with pytest.raises(InvalidOptionError, match="reconstruction"):
        verify_models(model, model, data, task="reconstruction")
    # A declared task wins over the [N, C] heuristic.
    declared = mlp(make_weights(), metadata={"task": "regression"})
    assert verify_models(declared, declared, data)["task"] == "generic"


def test_mismatched_outputs_are_a_verification_error() -> None:
    weights = make_weights()
    with pytest.raises(VerificationError, match="different outputs"):
        verify_models(mlp(weights), mlp(weights, out_name="probs"), make_data())


def test_static_batch_one_model_runs_sample_by_sample() -> None:
    weights = make_weights()
    model = mlp(weights, batch=1)
    data = make_data(n=6)
    report = verify_models(model, model, data, batch_size=256)
    assert report["num_samples"] == 6 and report["outputs"]["logits"]["top1_agreement"] == 1.0


def test_summary_lists_key_numbers() -> None:
    weights = make_weights()
    report = verify_models(mlp(weights), mlp({**weights, "b1": weights["b1"] + 1}), make_data())
    text = summarize(report)
    lines = text.splitlines()
    assert lines[0] == "verified on 50 samples (task: classification)"
    assert lines[1].startswith("model size:")
    assert f"max|err| {report['outputs']['logits']['max_abs_error']:.3g}" in lines[2]
    assert "top-1 agreement" in lines[3] and "accuracy" in lines[3]


# ------------------------------------------------------------------------------------------------
# Foreign metadata and detectors
# ------------------------------------------------------------------------------------------------
def test_unknown_declared_task_falls_back_to_generic(caplog: pytest.LogCaptureFixture) -> None:
    weights = make_weights()
    model = mlp(weights, metadata={"task": "pose", "names": "{0: 'person'}"})
    with caplog.at_level("WARNING", logger="fls_compress"):
        report = verify_models(model, model, make_data(), task="pose")  # as the pipeline passes it through
    assert report["task"] == "generic"
    assert report["task_fallback"] == {"declared": "pose", "used": "generic", "reason": "unknown task in model metadata"}
    assert report["outputs"]["logits"]["cosine_similarity"] == pytest.approx(1.0)
    assert any("task='pose'" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidOptionError, match="unknown task 'segmentation'"):
        verify_models(model, model, make_data(), task="segmentation")


def _detector(boxes: np.ndarray, scores: np.ndarray) -> onnx.ModelProto:
    """A 'detector' that ignores its input and returns a constant [1, 4+C, N] prediction (+ 0 * x)."""
    pred = np.concatenate([boxes.T, scores.T], axis=0)[None].astype(np.float32)
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["pred", "z"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 1])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", pred.shape[1], pred.shape[2]])],
        initializer=[numpy_helper.from_array(pred, "pred"), numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
                     numpy_helper.from_array(np.array([1, 2], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in {"task": "detect", "names": "{0: 'a', 1: 'b'}", "stride": "32"}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model


def test_detector_top_k_box_agreement_matches_iou_by_hand() -> None:
    from fls_compress.verify_detection import box_iou

    n = 8
    boxes = np.array([[10.0 * i, 10.0, 4.0, 4.0] for i in range(n)])
    scores = np.zeros((n, 2))
    scores[np.arange(n), np.arange(n) % 2] = np.linspace(0.9, 0.2, n)
    # compressed: box 0 shifted by 1 px in x (IoU = 3*4 / (2*16 - 12) = 0.6 -> kept), box 1 by 2 px
    # (IoU = 8 / 24 = 1/3 -> lost), box 2 with the other class (lost); the other 5 identical: 6/8
    moved = boxes.copy()
    moved[0, 0] += 1.0
    moved[1, 0] += 2.0
    swapped = scores.copy()
    swapped[2] = swapped[2][::-1]
    assert box_iou(boxes[:1], moved[:1])[0, 0] == pytest.approx(0.6)
    assert box_iou(boxes[1:2], moved[1:2])[0, 0] == pytest.approx(1 / 3)
    data = CalibrationData({"x": np.ones((3, 3, 1), np.float32)}, None, synthetic=False, source="test")
    original = _detector(boxes, scores)
    report = verify_models(original, _detector(moved, swapped), data)
    assert report["task"] == "detection" and "task_fallback" not in report
    out = report["outputs"]["output0"]
    assert out["topk_box_agreement"] == pytest.approx(6 / 8) and out["topk_boxes"] == 8
    assert verify_models(original, original, data)["outputs"]["output0"]["topk_box_agreement"] == 1.0
    assert "top-8 box agreement" in summarize(report)
