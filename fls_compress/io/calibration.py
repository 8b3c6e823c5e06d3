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
from fls_compress.io.input_specs import Dim, InputSpec, embedding_ranges, graph_input_specs, output_classes
from fls_compress.io.synthesis import check_user_shape, synthesize_inputs

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


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _convert_dtype(where: str, spec: InputSpec, arr: np.ndarray) -> np.ndarray:
    """Cast ``arr`` to the input's dtype where that is lossless in kind, refuse it otherwise."""
    want = spec.dtype
    have = arr.dtype
    if have == want:
        return arr
    if want.kind == "f":
        if have.kind == "f":
            with np.errstate(over="ignore"):  # overflow becomes Inf, refused by _check_finite
                return arr.astype(want)
        raise InvalidDataError(
            f"{where}: input '{spec.name}' is {have} data but the model expects {want}; "
            "convert it to float (integer pixel values usually also need scaling)"
        )
    if want.kind in "iu":
        if have.kind in "iu":
            info = np.iinfo(want)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise InvalidDataError(f"{where}: input '{spec.name}' has values outside the range of {want}")
            return arr.astype(want)
        raise InvalidDataError(f"{where}: input '{spec.name}' is {have} data but the model expects integer {want}")
    if want.kind == "b":
        raise InvalidDataError(f"{where}: input '{spec.name}' is {have} data but the model expects bool")
    raise InvalidDataError(f"{where}: input '{spec.name}' has model type {want}, which is not supported")


def _check_shape(where: str, spec: InputSpec, arr: np.ndarray) -> None:
    """Rank and static dimensions must match; a static leading 1 accepts any sample count."""
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise InvalidDataError(
            f"{where}: input '{spec.name}' has shape {arr.shape} (rank {arr.ndim}); "
            f"the model expects {spec.describe_shape()} (rank {len(spec.shape)})"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, arr.shape)):
        if axis == spec.batch_axis and spec.one_sample_at_a_time:
            continue
        if isinstance(want, int) and want != have:
            raise InvalidDataError(
                f"{where}: input '{spec.name}' has shape {arr.shape}; the model expects {spec.describe_shape()}"
            )


def _check_index_range(where: str, name: str, arr: np.ndarray, rows: int) -> None:
    """Token ids must index inside the embedding table they are gathered from (``[-rows, rows)``)."""
    if arr.size and (int(arr.min()) < -rows or int(arr.max()) >= rows):
        bad = int(arr.max()) if int(arr.max()) >= rows else int(arr.min())
        raise InvalidDataError(
            f"{where}: input '{name}' holds index {bad}, outside the {rows}-row table it is gathered from"
        )


def _scalar_value(where: str, spec: InputSpec, value: object) -> np.ndarray:
    """One value for a rank-0 input, as a 0-d array of the input's dtype."""
    arr = np.asarray(value)
    if arr.size != 1:
        if arr.ndim >= 1 and arr.size and np.all(arr == arr.reshape(-1)[0]):
            arr = arr.reshape(-1)[:1]
        else:
            raise InvalidDataError(
                f"{where}: input '{spec.name}' is a scalar (rank 0), shared by all samples; "
                f"got an array of shape {arr.shape} with differing values"
            )
    arr = arr.reshape(())
    if spec.dtype.kind in "iu" and arr.dtype.kind == "f":
        if not float(arr) == int(arr):
            raise InvalidDataError(f"{where}: input '{spec.name}' is {spec.dtype}; got non-integer value {float(arr)}")
        arr = arr.astype(np.int64)
    arr = _convert_dtype(where, spec, arr)
    _check_finite(where, spec.name, arr)
    return np.array(arr)  # ascontiguousarray would give a 0-d array a dimension


def _check_finite(where: str, name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind != "f":
        return
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = int(np.count_nonzero(np.isinf(arr)))
    if n_nan or n_inf:
        found = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
        raise InvalidDataError(f"{where}: input '{name}' contains {found} value(s); clean the data first")


def _check_labels(where: str, labels: np.ndarray, n_samples: int, n_classes: int | None) -> np.ndarray:
    """Labels must be a 1-D integer array with one entry per sample, inside ``[0, n_classes)``."""
    if labels.ndim != 1:
        raise InvalidDataError(f"{where}: labels have shape {labels.shape}; expected a 1-D array of class indices")
    if labels.dtype.kind not in "iu":
        raise InvalidDataError(f"{where}: labels are {labels.dtype}; expected integer class indices")
    if len(labels) != n_samples:
        raise InvalidDataError(f"{where}: there are {len(labels)} labels for {n_samples} samples")
    if labels.size and labels.min() < 0:
        raise InvalidDataError(f"{where}: labels contain negative value {int(labels.min())}")
    if n_classes is not None and labels.size and labels.max() >= n_classes:
        raise InvalidDataError(
            f"{where}: label {int(labels.max())} is out of range; "
            f"the model has {n_classes} classes (0..{n_classes - 1})"
        )
    return labels.astype(np.int64)


def validate_inputs(
    arrays: dict[str, np.ndarray],
    model: onnx.ModelProto,
    *,
    where: str,
    consts: dict[str, float | int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Check ``arrays`` (input name -> batch) against ``model``'s graph inputs.

    Returns ``(inputs, constants)``: the batched inputs cast to the graph dtypes, in graph order,
    and the rank-0 inputs as 0-d arrays (from ``consts`` when given there, else from ``arrays``).
    ``where`` names the data source in error messages.
    """
    consts = dict(consts or {})
    specs = {spec.name: spec for spec in graph_input_specs(model)}
    if not specs:
        raise InvalidDataError(f"{where}: the model has no inputs to feed")
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise InvalidDataError(
            f"{where}: array '{unknown[0]}' is not a model input (inputs: {', '.join(repr(s) for s in specs)})"
        )
    _check_const_names(consts, specs)
    missing = [name for name in specs if name not in arrays and name not in consts]
    if missing:
        hint = f"; give a rank-0 input's value with --const {missing[0]}=VALUE" if specs[missing[0]].is_scalar else ""
        raise InvalidDataError(
            f"{where}: input '{missing[0]}' is missing (the model needs {', '.join(repr(s) for s in specs)}){hint}"
        )

    ranges = embedding_ranges(model)
    inputs: dict[str, np.ndarray] = {}
    constants: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if spec.is_scalar:
            if name in consts and name in arrays:
                logger.warning("input '%s': the value given as a constant replaces the one in %s", name, where)
            value = consts[name] if name in consts else arrays[name]
            constants[name] = _scalar_value(where, spec, value)
            continue
        if name in consts:
            raise InvalidOptionError(f"input '{name}' is not a scalar (shape {spec.describe_shape()}); it cannot be a constant")
        arr = np.asarray(arrays[name])
        if arr.dtype.kind not in "biuf":
            raise InvalidDataError(f"{where}: input '{name}' has unsupported dtype {arr.dtype}")
        _check_shape(where, spec, arr)
        if arr.ndim == 0:
            raise InvalidDataError(f"{where}: input '{name}' is a scalar; expected a batch with a sample axis")
        arr = _convert_dtype(where, spec, arr)
        _check_finite(where, name, arr)
        if name in ranges and arr.dtype.kind in "iu":
            _check_index_range(where, name, arr, ranges[name])
        if spec.batch_axis:
            arr = np.moveaxis(arr, spec.batch_axis, 0)  # samples on axis 0, see CalibrationData.batch_axes
        inputs[name] = np.ascontiguousarray(arr)
    if not inputs:
        raise InvalidDataError(f"{where}: every model input is a scalar; there is no sample axis to calibrate over")
    first = next(iter(inputs))
    for name, arr in inputs.items():
        if arr.shape[0] != inputs[first].shape[0]:
            raise InvalidDataError(
                f"{where}: input '{first}' has {inputs[first].shape[0]} samples but input '{name}' has {arr.shape[0]}"
            )
    if inputs[first].shape[0] == 0:
        raise InvalidDataError(f"{where}: the data holds 0 samples")
    return inputs, constants


def _check_const_names(consts: dict[str, object], specs: dict[str, InputSpec]) -> None:
    for name in consts:
        if name not in specs:
            raise InvalidOptionError(f"constant '{name}' is not a model input (inputs: {', '.join(repr(s) for s in specs)})")
        if not specs[name].is_scalar:
            raise InvalidOptionError(
                f"input '{name}' is not a scalar (shape {specs[name].describe_shape()}); it cannot be a constant"
            )


def _check_shape_names(shapes: dict[str, tuple[int, ...]], specs: dict[str, InputSpec]) -> None:
    for name, shape in shapes.items():
        if name not in specs:
            raise InvalidOptionError(f"shape given for '{name}', which is not a model input (inputs: {', '.join(repr(s) for s in specs)})")
        check_user_shape(specs[name], tuple(int(d) for d in shape))


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
    _check_shape_names(shapes, specs)
    _check_const_names(consts or {}, specs)
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
        labels = _check_labels(labels_where, np.asarray(labels), n_samples, output_classes(model))
    data = CalibrationData(
        inputs, labels, synthetic=False, source=where, max_batch=_max_batch(model), constants=constants,
        batch_axes=batch_axes_of(specs),
    )
    logger.info(
        "loaded %d calibration samples from %s%s", data.num_samples, where, " with labels" if labels is not None else ""
    )
    return data
