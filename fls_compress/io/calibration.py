"""Calibration / evaluation data: loading, strict validation against the ONNX graph, batching.

The Fisher information that drives pruning is estimated from model inputs, so data that does not
match the graph must fail early, with a message a user can act on, instead of deep inside
onnxruntime or torch. :func:`load_calibration` accepts

* a ``.npz`` file: one array per graph input, keyed by input name (all with the same leading
  sample count), plus an optional ``labels`` array;
* a ``.npy`` file: the batch for a single-input model;
* a directory of ``.npz`` files (each one sample or one batch, keyed like the single file) or of
  ``.npy`` files (named after the inputs, e.g. ``input.npy``, or, for a single-input model, any
  names, read in sorted order, each one sample or one batch); ``labels.npy`` holds the labels;
* ``None``: synthetic standard-normal inputs built from the graph's input shapes (a rough Fisher only).

Conventions: axis 0 of every array is the sample axis and every array has the graph input's rank
(a directory file may also drop axis 0 to hold a single sample); state-like inputs declared
``[layers, batch, hidden]`` are given in that layout, with the samples on their batch axis (see
:attr:`CalibrationData.batch_axes`). Static dimensions must match;
dynamic ones (``dim_param``, unknown, or the ``-1`` / ``0`` some exporters write) are free. A
rank-0 input (e.g. a sample rate) has no sample axis: it takes ONE value for all samples, from a
scalar (or one-element) array in the data or from ``consts={"sr": 16000}``; it is kept apart in
:attr:`CalibrationData.constants` and added to every batch. A model whose leading dimension is a static ``1``
is treated as taking one sample at a time: any number of samples is accepted and
:meth:`CalibrationData.batches` never yields more than one. Float data is cast to the input's float
type (float64 -> float32 silently); integer data feeds integer inputs only; float data for integer
inputs is refused; integer inputs used as ``Gather`` indices into a constant table (token ids)
must lie inside the table. Every problem is an :class:`~fls_compress.errors.InvalidDataError` with a
one-line message naming the file, the input and what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from fls_compress.errors import InvalidDataError, InvalidOptionError
from fls_compress.io.data_files import (
    LABELS_KEY,
    batch_axes_of,
    load_labels,
    read_directory,
    read_npy,
    read_npz,
)
from fls_compress.io.input_specs import Dim, InputSpec, graph_input_specs, output_classes
from fls_compress.io.synthesis import synthesize_inputs
from fls_compress.io.validation import check_const_names, check_labels, check_shape_names, validate_inputs

__all__ = [
    "LABELS_KEY",
    "CalibrationData",
    "Dim",
    "InputSpec",
    "graph_input_specs",
    "load_calibration",
    "load_labels",
    "output_classes",
    "validate_inputs",
]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationData:
    """Validated model inputs (and optional labels), one row per sample along axis 0.

    Attributes
    ----------
    inputs:
        One array per graph input, keyed by input name, already in the input's dtype.
    labels:
        ``int64`` class labels ``[num_samples]`` or ``None``.
    synthetic:
        ``True`` when the inputs were generated (no real data was given).
    source:
        Where the data came from (a path, or ``"synthetic"``), for reports and messages.
    max_batch:
        Largest batch the model accepts (``1`` for a static leading dimension of 1), or ``None``.
    constants:
        Rank-0 inputs: one 0-d array per input, shared by every sample and added to every batch.
    synthetic_shapes:
        For synthetic data, the shape generated per input (sample axis first).
    batch_axes:
        Inputs whose batch axis in the model is not axis 0 (state ``[layers, batch, hidden]``): their
        arrays in :attr:`inputs` hold the samples on axis 0 like every other input, and
        :meth:`feed` moves that axis back to where the model expects it.
    defaulted_dims:
        For synthetic data, the axes per input whose dynamic size was not given and defaulted to
        :data:`fls_compress.io.synthesis.DEFAULT_DYNAMIC_DIM` (each one logged as a warning).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    synthetic: bool
    source: str
    max_batch: int | None = None
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic_shapes: dict[str, list[int]] = field(default_factory=dict)
    defaulted_dims: dict[str, list[int]] = field(default_factory=dict)
    batch_axes: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of samples (the common leading dimension of every input)."""
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, indices: np.ndarray) -> CalibrationData:
        """The samples at ``indices`` (in that order) as a new :class:`CalibrationData`."""
        return CalibrationData(
            inputs={name: arr[indices] for name, arr in self.inputs.items()},
            labels=None if self.labels is None else self.labels[indices],
            synthetic=self.synthetic,
            source=self.source,
            max_batch=self.max_batch,
            constants=self.constants,
            synthetic_shapes=self.synthetic_shapes,
            defaulted_dims=self.defaulted_dims,
            batch_axes=self.batch_axes,
        )

    def subset(self, n: int) -> CalibrationData:
        """The first ``n`` samples (all of them when ``n`` exceeds the sample count)."""
        if n < 1:
            raise InvalidOptionError(f"subset size must be at least 1, got {n}")
        return self.take(np.arange(min(n, self.num_samples)))

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """Randomly split into ``(calibration, holdout)``, e.g. to verify on samples the Fisher never saw.

        The holdout gets ``round(holdout_fraction * num_samples)`` samples, clamped so both parts keep
        at least one. The permutation comes from ``numpy.random.default_rng(seed)``.
        """
        if not 0.0 < holdout_fraction < 1.0:
            raise InvalidOptionError(f"holdout fraction must be between 0 and 1 (exclusive), got {holdout_fraction}")
        n = self.num_samples
        if n < 2:
            raise InvalidDataError(f"{self.source}: {n} sample(s) cannot be split into calibration and holdout sets")
        n_holdout = min(max(round(holdout_fraction * n), 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        return self.take(np.sort(order[n_holdout:])), self.take(np.sort(order[:n_holdout]))

    def _batch_indices(self, batch_size: int, shuffle: bool, seed: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise InvalidOptionError(f"batch size must be at least 1, got {batch_size}")
        if self.max_batch is not None:
            batch_size = min(batch_size, self.max_batch)
        n = self.num_samples
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: array}`` batches of at most ``batch_size`` samples (last one may be smaller).

        ``batch_size`` is capped by :attr:`max_batch`. With ``shuffle`` the order is a permutation
        drawn from ``numpy.random.default_rng(seed)``; otherwise samples come in stored order.
        """
        for index in self._batch_indices(batch_size, shuffle, seed):
            yield self.feed({name: arr[index] for name, arr in self.inputs.items()})

    def to_model_layout(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` (samples on axis 0) with each input's sample axis moved to its :attr:`batch_axes` place."""
        return {
            name: np.moveaxis(arr, 0, self.batch_axes[name]) if name in self.batch_axes else arr
            for name, arr in batch.items()
        }

    def feed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` in the model's layout plus the rank-0 :attr:`constants`: a complete onnxruntime feed."""
        return {**self.to_model_layout(batch), **self.constants}

    def labeled_batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """Like :meth:`batches`, but yield ``(inputs, labels)`` pairs (labels ``None`` when absent)."""
        for index in self._batch_indices(batch_size, shuffle, seed):
            inputs = self.feed({name: arr[index] for name, arr in self.inputs.items()})
            yield inputs, (None if self.labels is None else self.labels[index])


def _max_batch(model: onnx.ModelProto) -> int | None:
    return 1 if any(spec.one_sample_at_a_time for spec in graph_input_specs(model)) else None


def load_calibration(
    source: str | Path | None,
    model: onnx.ModelProto,
    *,
    num_synthetic: int = 256,
    seed: int = 0,
    labels_path: str | Path | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    consts: dict[str, float | int] | None = None,
) -> CalibrationData:
    """Load and validate calibration data for ``model`` (see the module docstring for the formats).

    Parameters
    ----------
    source:
        A ``.npz`` / ``.npy`` file, a directory of them, or ``None`` for synthetic data.
    model:
        The ONNX model the data must feed.
    num_synthetic:
        Number of synthetic samples (only used when ``source`` is ``None``; a graph whose leading
        dimension is a static size other than 1 gets exactly that many).
    seed:
        Seed of the synthetic data generator.
    labels_path:
        Optional separate labels file (``.npy`` or ``.npz``); it overrides labels stored with the data.
    shapes:
        Full input shapes (sample axis first), e.g. ``{"images": (1, 3, 320, 320)}`` (CLI
        ``--shape images=1x3x320x320``): the sizes of dynamic dimensions for synthetic data (see
        :mod:`fls_compress.io.synthesis`); with real data, the data's non-sample dimensions must
        equal them.
    consts:
        Values of rank-0 inputs, e.g. ``{"sr": 16000}`` (CLI ``--const sr=16000``); they take
        precedence over a value stored in the data.
    """
    shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    specs = {spec.name: spec for spec in graph_input_specs(model)}
    check_shape_names(shapes, specs)
    check_const_names(consts or {}, specs)
    if source is None:
        if labels_path is not None:
            raise InvalidDataError(f"{labels_path}: labels were given without calibration data")
        logger.warning(
            "no calibration data given: using %d synthetic standard-normal samples; "
            "the Fisher estimate (and thus pruning quality) will only be rough",
            num_synthetic,
        )
        arrays, used, defaulted = synthesize_inputs(model, num_synthetic, seed, shapes)
        missing = [n for n, spec in specs.items() if spec.is_scalar and n not in (consts or {})]
        if missing:
            raise InvalidDataError(
                f"input '{missing[0]}' is a scalar (rank 0) whose value cannot be guessed; "
                f"give it with --const {missing[0]}=VALUE, or pass --data"
            )
        inputs, constants = validate_inputs(arrays, model, where="synthetic", consts=consts)
        return CalibrationData(
            inputs, None, synthetic=True, source="synthetic", max_batch=_max_batch(model), constants=constants,
            synthetic_shapes=used, defaulted_dims=defaulted, batch_axes=batch_axes_of(specs),
        )

    path = Path(source)
    where = str(path)
    if not path.exists():
        raise InvalidDataError(f"{where}: data file or directory does not exist")
    if path.is_dir():
        arrays = read_directory(path, specs)
    elif path.suffix == ".npz":
        arrays = read_npz(path)
    elif path.suffix == ".npy":
        fed = [n for n, spec in specs.items() if not spec.is_scalar]
        if len(fed) != 1:
            raise InvalidDataError(
                f"{where}: a .npy file can only feed a single-input model; this model has inputs "
                f"{', '.join(repr(s) for s in specs)}, use a .npz keyed by input name"
            )
        arrays = {fed[0]: read_npy(path)}
    else:
        raise InvalidDataError(
            f"{where}: unsupported data file type '{path.suffix}' (expected .npz, .npy or a directory)"
        )

    labels = arrays.pop(LABELS_KEY, None) if LABELS_KEY not in specs else None
    labels_where = where
    if labels_path is not None:
        if labels is not None:
            logger.warning("labels in %s are replaced by those in %s", where, labels_path)
        labels = load_labels(labels_path)
        labels_where = str(labels_path)
    inputs, constants = validate_inputs(arrays, model, where=where, consts=consts)
    for name, shape in shapes.items():
        axis = specs[name].batch_axis
        model_shape = np.moveaxis(inputs[name], 0, axis).shape if name in inputs else shape
        if tuple(model_shape[:axis] + model_shape[axis + 1 :]) != shape[:axis] + shape[axis + 1 :]:
            raise InvalidDataError(
                f"{where}: input '{name}' has shape {inputs[name].shape}, but --shape gives {'x'.join(map(str, shape))}"
            )
    if labels is not None:
        n_samples = next(iter(inputs.values())).shape[0]
        labels = check_labels(labels_where, np.asarray(labels), n_samples, output_classes(model))
    data = CalibrationData(
        inputs, labels, synthetic=False, source=where, max_batch=_max_batch(model), constants=constants,
        batch_axes=batch_axes_of(specs),
    )
    logger.info(
        "loaded %d calibration samples from %s%s", data.num_samples, where, " with labels" if labels is not None else ""
    )
    return data
