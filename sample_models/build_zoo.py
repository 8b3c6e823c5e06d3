"""Build the sample model zoo that ``sample_models/zoo.yaml`` compresses with ``fls-compress batch``.

The zoo is the two reference samples (``build_samples.py``: ``mnist_cnn.onnx``, ``mnist_autoencoder.onnx``)
plus, written next to them:

* ``zoo_cnn_w8.onnx`` and ``zoo_cnn_w32.onnx``: the sample CNN at half and double width (conv channels
  8-16 / 32-64, hidden 32 / 128), trained for a few epochs on the same MNIST training split, so they
  share ``mnist_cnn_calib.npz`` / ``mnist_cnn_test.npz``;
* ``zoo_broken_model.onnx``: the first 2 KiB of ``mnist_cnn.onnx`` (a truncated protobuf: the job must
  fail with exit code 3, bad model);
* ``zoo_bad_calib.npz``: the CNN calibration inputs with NaN pixels (the job must fail with exit code 5,
  bad data).

Everything is offline and deterministic for a given seed (seeded initialisation and batch order,
deterministic torch algorithms, one thread). Usage::

    python sample_models/build_zoo.py --out sample_models      # after build_samples.py (make samples)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sample_models.datasets import load_mnist5k, split_train_test  # noqa: E402
from sample_models.build_samples import (  # noqa: E402
    N_TEST,
    SPLIT_SEED,
    build_cnn,
    export_onnx,
    log,
    ort_predict,
    train_classifier,
)

WIDTHS: dict[str, tuple[tuple[int, int], int]] = {"w8": ((8, 16), 32), "w32": ((32, 64), 128)}
"""Variant name -> (conv channels, hidden width) of the CNN width variants."""

REQUIRED = ("mnist_cnn.onnx", "mnist_cnn_calib.npz", "mnist_cnn_test.npz", "mnist_autoencoder.onnx",
            "mnist_autoencoder_calib.npz", "mnist_autoencoder_test.npz")
BROKEN_BYTES = 2048


def build_zoo(out_dir: Path, *, seed: int = 0, epochs: int = 3) -> dict[str, object]:
    """Write the zoo variants into ``out_dir`` (which must hold the reference samples); returns facts about them."""
    missing = [name for name in REQUIRED if not (out_dir / name).is_file()]
    if missing:
        raise SystemExit(f"missing reference samples in {out_dir}: {', '.join(missing)} (run `make samples` first)")
    X, y = load_mnist5k()
    X_train, y_train, X_test, y_test = split_train_test(X, y, N_TEST, seed=SPLIT_SEED)
    images_train, images_test = X_train.reshape(-1, 1, 28, 28), X_test.reshape(-1, 1, 28, 28)
    facts: dict[str, object] = {}
    for name, (channels, hidden) in WIDTHS.items():
        torch.manual_seed(seed)
        model = build_cnn(channels, hidden)
        start = time.perf_counter()
        train_classifier(model, images_train, y_train, epochs=epochs, seed=seed)
        path = out_dir / f"zoo_cnn_{name}.onnx"
        export_onnx(model, torch.from_numpy(images_test[:2]), path, metadata={
            "task": "classification", "likelihood": "categorical", "num_classes": "10", "seed": str(seed),
            "architecture": f"CNN conv {channels[0]}-{channels[1]}, hidden {hidden}"})
        accuracy = float(np.mean(ort_predict(path, images_test).argmax(axis=1) == y_test))
        log(f"{path.name}: {epochs} epochs in {time.perf_counter() - start:.1f}s, test accuracy {accuracy:.4f}")
        facts[path.name] = {"channels": list(channels), "hidden": hidden, "test_accuracy": accuracy}

    broken = out_dir / "zoo_broken_model.onnx"
    broken.write_bytes((out_dir / "mnist_cnn.onnx").read_bytes()[:BROKEN_BYTES])
    calib = np.load(out_dir / "mnist_cnn_calib.npz")
    bad_inputs = calib["input"].copy()
    bad_inputs[:, :, :4, :4] = np.nan
    np.savez(out_dir / "zoo_bad_calib.npz", input=bad_inputs, labels=calib["labels"])
    log(f"{broken.name}: truncated to {BROKEN_BYTES} bytes; zoo_bad_calib.npz: NaN pixels")
    facts.update({broken.name: {"bytes": BROKEN_BYTES}, "zoo_bad_calib.npz": {"nan_pixels_per_image": 16}})
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="the samples directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the width variants")
    args = parser.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    build_zoo(args.out, seed=args.seed, epochs=args.epochs)
    log(f"zoo built in {time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
