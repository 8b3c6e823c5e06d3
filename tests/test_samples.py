"""The offline datasets and the sample-model building blocks (small, fast variants of the real build)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sample_models.datasets import load_digits_images, load_mnist5k, split_train_test
from fls_compress.io.calibration import load_calibration
from fls_compress.verification import bernoulli_nll, verify_models
from sample_models.build_samples import (
    AE_SIZES,
    build_all,
    build_autoencoder,
    build_cnn,
    count_parameters,
    export_onnx,
    torch_predict,
    train_autoencoder,
    train_classifier,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train on one thread, as the build script does: tiny batches gain nothing from two, and OpenMP
    spin-waiting makes them many times slower when other processes share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mnist_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_mnist5k()
    return split_train_test(X, y, 1000, seed=0)


def test_mnist5k_contents() -> None:
    X, y = load_mnist5k()
    assert X.shape == (5000, 784) and X.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)


def test_digits_contents() -> None:
    X, y = load_digits_images()
    assert X.shape == (1797, 8, 8) and X.dtype == np.float32 and y.dtype == np.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert set(np.unique(y)) == set(range(10))


def test_split_is_stratified_disjoint_and_deterministic(mnist_split) -> None:
    X_train, y_train, X_test, y_test = mnist_split
    assert len(X_train) == 4000 and len(X_test) == 1000
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    # No test image is also a training image (MNIST 5k has no exact duplicates).
    train_rows = {row.tobytes() for row in X_train}
    assert not any(row.tobytes() in train_rows for row in X_test)
    X, y = load_mnist5k()
    again = split_train_test(X, y, 1000, seed=0)
    np.testing.assert_array_equal(again[3], y_test)


def test_full_autoencoder_architecture() -> None:
    model = build_autoencoder()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(AE_SIZES[:-1], AE_SIZES[1:]))
    expected = sum(a * b + b for a, b in zip(AE_SIZES[:-1], AE_SIZES[1:]))
    assert count_parameters(model) == expected == 2_837_314
    kinds = [type(m).__name__ for m in model]
    # Linear code layer (30-d, 4th Linear) and linear output: 6 ReLUs for 8 Linear layers.
    assert kinds.count("ReLU") == 6
    code_position = [i for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)][3]
    assert isinstance(model[code_position + 1], torch.nn.Linear)
    assert isinstance(model[-1], torch.nn.Linear)


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_small_autoencoder_trains_exports_and_matches_torch(tmp_path: Path, mnist_split) -> None:
    X_train, _, X_test, _ = mnist_split
    torch.manual_seed(0)
    model = build_autoencoder((784, 64, 16, 64, 784))
    history = train_autoencoder(model, X_train[:500], epochs=3, batch_size=50, seed=0)
    assert history[-1] < history[0] < 600  # 784 * log(2) ~ 543 at chance
    path = tmp_path / "ae.onnx"
    proto = export_onnx(model, torch.from_numpy(X_test[:2]), path, metadata={"task": "reconstruction",
                                                                           "likelihood": "bernoulli"})
    assert {p.key: p.value for p in proto.metadata_props} == {"task": "reconstruction", "likelihood": "bernoulli"}
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for n in (3, 7):  # the batch dimension is dynamic
        logits = _ort(path, X_test[:n])
        assert logits.shape == (n, 784)
        np.testing.assert_allclose(logits, torch_predict(model, X_test[:n]), atol=1e-4, rtol=1e-5)

    np.savez(tmp_path / "test.npz", input=X_test[:100])
    data = load_calibration(tmp_path / "test.npz", onnx.load(path))
    report = verify_models(str(path), str(path), data)
    out = report["outputs"]["logits"]
    assert report["task"] == "reconstruction" and out["max_abs_error"] == 0.0
    expected_nll = bernoulli_nll(torch_predict(model, X_test[:100]), X_test[:100]).mean()
    assert out["bernoulli_nll_original"] == pytest.approx(expected_nll, rel=1e-5)


def test_small_cnn_trains_exports_and_matches_torch(tmp_path: Path, mnist_split) -> None:
    X_train, y_train, X_test, y_test = mnist_split
    images_train, images_test = X_train[:1000].reshape(-1, 1, 28, 28), X_test[:300].reshape(-1, 1, 28, 28)
    torch.manual_seed(0)
    model = build_cnn(channels=(4, 8), hidden=16)
    train_classifier(model, images_train, y_train[:1000], epochs=3, batch_size=32, lr=5e-3, seed=0)
    path = tmp_path / "cnn.onnx"
    export_onnx(model, torch.from_numpy(images_test[:2]), path, metadata={"task": "classification"})
    logits = _ort(path, images_test)
    np.testing.assert_allclose(logits, torch_predict(model, images_test), atol=1e-4, rtol=1e-5)
    accuracy = float(np.mean(logits.argmax(1) == y_test[:300]))
    assert accuracy > 0.6  # chance is 0.1; 3 epochs on 1000 images of a tiny CNN

    np.savez(tmp_path / "test.npz", input=images_test, labels=y_test[:300])
    data = load_calibration(tmp_path / "test.npz", onnx.load(path))
    out = verify_models(str(path), str(path), data)["outputs"]["logits"]
    assert out["top1_agreement"] == 1.0 and out["accuracy_original"] == pytest.approx(accuracy)


def test_build_all_writes_consistent_manifest(tmp_path: Path) -> None:
    small_ae = (784, 64, 16, 64, 784)
    manifest = build_all(
        tmp_path, seed=0, ae_epochs=1, cnn_epochs=1, ae_sizes=small_ae, cnn_channels=(4, 8), cnn_hidden=16
    )
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    for name in ("mnist_autoencoder", "mnist_cnn"):
        entry = manifest["models"][name]
        for key in ("model", "calib", "test"):
            path = tmp_path / entry[key]["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry[key]["sha256"]
        assert entry["metrics"]["max_abs_diff_ort_vs_torch"] < 1e-3
    ae = manifest["models"]["mnist_autoencoder"]
    assert ae["parameters"] == count_parameters(build_autoencoder(small_ae))
    assert ae["architecture"] == list(small_ae)
    test_set = load_calibration(tmp_path / "mnist_autoencoder_test.npz", onnx.load(tmp_path / ae["model"]["file"]))
    assert test_set.num_samples == 1000 and test_set.labels is None
    report = verify_models(str(tmp_path / ae["model"]["file"]), str(tmp_path / ae["model"]["file"]), test_set)
    assert report["outputs"]["logits"]["bernoulli_nll_original"] == pytest.approx(
        ae["metrics"]["test_bce_per_image"], rel=1e-6
    )
    cnn = manifest["models"]["mnist_cnn"]
    calib = load_calibration(tmp_path / "mnist_cnn_calib.npz", onnx.load(tmp_path / cnn["model"]["file"]))
    assert calib.num_samples == 1024 and calib.inputs["input"].shape == (1024, 1, 28, 28)
    assert calib.labels is not None and calib.labels.max() <= 9
    assert 0.3 < cnn["metrics"]["test_accuracy"] <= 1.0  # one epoch of a tiny CNN; chance is 0.1
