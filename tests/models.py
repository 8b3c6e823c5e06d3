"""Small ONNX fixtures built inside the tests from offline data (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sample_models.datasets import load_mnist5k, split_train_test
from sample_models.build_samples import build_autoencoder, build_cnn, export_onnx, train_autoencoder, train_classifier

SMALL_AE = (784, 128, 32, 128, 784)


def small_autoencoder(out_dir: Path, epochs: int = 8) -> dict[str, Path]:
    """A 784-128-32-128-784 autoencoder on MNIST-5k with calibration/test npz files."""
    X, y = load_mnist5k()
    Xtr, _, Xte, _ = split_train_test(X, y, 1000, seed=0)
    torch.manual_seed(0)
    model = build_autoencoder(SMALL_AE)
    train_autoencoder(model, Xtr[:3000], epochs=epochs, seed=0)
    path = out_dir / "ae.onnx"
    export_onnx(model.eval(), torch.from_numpy(Xtr[:2]), path, metadata={"task": "reconstruction", "likelihood": "bernoulli"})
    np.savez(out_dir / "ae_calib.npz", input=Xtr[:512])
    np.savez(out_dir / "ae_test.npz", input=Xte[:500])
    return {"model": path, "calib": out_dir / "ae_calib.npz", "test": out_dir / "ae_test.npz"}


def small_cnn(out_dir: Path, epochs: int = 2) -> dict[str, Path]:
    """A small MNIST CNN classifier with labelled calibration/test npz files."""
    X, y = load_mnist5k()
    Xtr, ytr, Xte, yte = split_train_test(X, y, 1000, seed=0)
    Xtr, Xte = Xtr.reshape(-1, 1, 28, 28), Xte.reshape(-1, 1, 28, 28)
    torch.manual_seed(0)
    model = build_cnn((8, 16), 32)
    train_classifier(model, Xtr[:3000], ytr[:3000], epochs=epochs, seed=0)
    path = out_dir / "cnn.onnx"
    export_onnx(model.eval(), torch.from_numpy(Xtr[:2]), path, metadata={"task": "classification"})
    np.savez(out_dir / "cnn_calib.npz", input=Xtr[:256], labels=ytr[:256])
    np.savez(out_dir / "cnn_test.npz", input=Xte[:300], labels=yte[:300])
    return {"model": path, "calib": out_dir / "cnn_calib.npz", "test": out_dir / "cnn_test.npz"}
