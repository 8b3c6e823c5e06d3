"""Strict validation of model-input arrays against the ONNX graph (see :mod:`fls_compress.io.calibration`).

Every check raises :class:`~fls_compress.errors.InvalidDataError` (bad data) or
:class:`~fls_compress.errors.InvalidOptionError` (bad ``shapes`` / ``consts`` options) with a
one-line message naming the data source, the input and what is wrong.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from fls_compress.errors import InvalidDataError, InvalidOptionError
from fls_compress.io.input_specs import InputSpec, embedding_ranges, graph_input_specs
from fls_compress.io.synthesis import check_user_shape

logger = logging.getLogger(__name__)


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


def check_labels(where: str, labels: np.ndarray, n_samples: int, n_classes: int | None) -> np.ndarray:
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
    check_const_names(consts, specs)
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


def check_const_names(consts: dict[str, object], specs: dict[str, InputSpec]) -> None:
    for name in consts:
        if name not in specs:
            raise InvalidOptionError(f"constant '{name}' is not a model input (inputs: {', '.join(repr(s) for s in specs)})")
        if not specs[name].is_scalar:
            raise InvalidOptionError(
                f"input '{name}' is not a scalar (shape {specs[name].describe_shape()}); it cannot be a constant"
            )


def check_shape_names(shapes: dict[str, tuple[int, ...]], specs: dict[str, InputSpec]) -> None:
    for name, shape in shapes.items():
        if name not in specs:
            raise InvalidOptionError(f"shape given for '{name}', which is not a model input (inputs: {', '.join(repr(s) for s in specs)})")
        check_user_shape(specs[name], tuple(int(d) for d in shape))
