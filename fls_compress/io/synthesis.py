"""Synthetic calibration inputs built from the graph's input declarations (no data given).

Shapes: a static dimension is used as declared. A dynamic dimension takes, in this order, the size
from the user's ``shapes`` entry for that input (``--shape images=1x3x320x320``), or
:data:`DEFAULT_DYNAMIC_DIM`; each default is logged as a warning and recorded (the caller stores it
in ``CalibrationData.synthetic_shapes``). Axis 0 is the sample axis: ``num_samples`` samples are
generated whatever size the user's shape gives it, unless the graph fixes it to a size other than 1.
For state-like inputs (``[layers, batch, hidden]``) the batch axis found by
:func:`fls_compress.io.input_specs.graph_input_specs` plays the role of axis 0.

Values: float inputs are standard normal; integer inputs read directly as ``Gather`` indices into a
constant table (token ids) are uniform in ``[0, rows)``; other integer or bool inputs cannot be
guessed and are refused. Rank-0 inputs are never synthesised: their value comes from ``consts``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from fls_compress.errors import InvalidDataError, InvalidOptionError
from fls_compress.io.input_specs import InputSpec, embedding_ranges, graph_input_specs

logger = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 32
"""Size given to a dynamic non-sample dimension when no shape is supplied (a multiple of 32, so the
feature maps of stride-32 detector backbones stay at least 1x1)."""


def check_user_shape(spec: InputSpec, shape: tuple[int, ...]) -> None:
    """``shape`` (a full input shape, sample axis included) must fit ``spec``'s rank and static dims."""
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise InvalidOptionError(
            f"shape {'x'.join(map(str, shape))} for input '{spec.name}' has rank {len(shape)}; "
            f"the model expects {spec.describe_shape()}"
        )
    for axis, (want, have) in enumerate(zip(spec.shape, shape)):
        if have < 1:
            raise InvalidOptionError(f"shape for input '{spec.name}': dimension {axis} must be at least 1, got {have}")
        if axis != spec.batch_axis and isinstance(want, int) and want != have:
            raise InvalidOptionError(
                f"shape {'x'.join(map(str, shape))} for input '{spec.name}' disagrees with the model's "
                f"{spec.describe_shape()} at axis {axis}"
            )


def synthetic_shape(spec: InputSpec, num_samples: int, user_shape: tuple[int, ...] | None) -> tuple[list[int], list[int]]:
    """(shape of the generated array in the model's layout, axes that got :data:`DEFAULT_DYNAMIC_DIM`)."""
    if spec.shape is None:
        if user_shape is None:
            raise InvalidDataError(
                f"input '{spec.name}' has no declared shape; give one with --shape {spec.name}=..., or pass --data"
            )
        return [num_samples, *user_shape[1:]], []
    if user_shape is not None:
        check_user_shape(spec, user_shape)
    shape: list[int] = []
    defaulted: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if axis == spec.batch_axis and (not isinstance(dim, int) or dim == 1):
            shape.append(num_samples)
        elif isinstance(dim, int):
            shape.append(dim)
        elif user_shape is not None:
            shape.append(int(user_shape[axis]))
        else:
            shape.append(DEFAULT_DYNAMIC_DIM)
            defaulted.append(axis)
    return shape, defaulted


def synthesize_inputs(
    model: onnx.ModelProto,
    num_samples: int,
    seed: int,
    shapes: dict[str, tuple[int, ...]],
) -> tuple[dict[str, np.ndarray], dict[str, list[int]], dict[str, list[int]]]:
    """Generated arrays for every non-scalar input (model layout), the shape used per input and the
    axes per input that got :data:`DEFAULT_DYNAMIC_DIM` (see the module docstring)."""
    if num_samples < 1:
        raise InvalidOptionError(f"number of synthetic samples must be at least 1, got {num_samples}")
    rng = np.random.default_rng(seed)
    ranges = embedding_ranges(model)
    arrays: dict[str, np.ndarray] = {}
    used: dict[str, list[int]] = {}
    defaults: dict[str, list[int]] = {}
    for spec in graph_input_specs(model):
        if spec.is_scalar:
            continue
        shape, defaulted = synthetic_shape(spec, num_samples, shapes.get(spec.name))
        if defaulted:
            defaults[spec.name] = defaulted
            logger.warning(
                "input '%s' has dynamic dimension(s) at axis %s; synthetic data uses size %d there "
                "(set it with --shape %s=%s)",
                spec.name, ", ".join(map(str, defaulted)), DEFAULT_DYNAMIC_DIM, spec.name,
                "x".join(str(1 if a == spec.batch_axis else d) for a, d in enumerate(shape)),
            )
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu" and spec.name in ranges:
            arrays[spec.name] = rng.integers(0, ranges[spec.name], size=shape).astype(spec.dtype)
        else:
            raise InvalidDataError(
                f"input '{spec.name}' is {spec.dtype}; synthetic data can only be generated for float inputs "
                "and for token ids that index an embedding table, pass --data"
            )
        used[spec.name] = shape
    return arrays, used, defaults
