"""Calibration set and held-out verification set for a run."""

from __future__ import annotations

import os

import onnx

from ..configs import RunOptions
from .calibration import CalibrationData, load_calibration


def prepare_data(
    model: onnx.ModelProto,
    data: str | os.PathLike[str] | None,
    eval_data: str | os.PathLike[str] | None,
    labels: str | os.PathLike[str] | None,
    opts: RunOptions,
) -> tuple[CalibrationData, CalibrationData]:
    """Calibration data (at most ``num_calibration`` samples) and verification data (``eval_data``, or a
    seeded ``holdout_fraction`` split of ``data``)."""
    calib = load_calibration(
        None if data is None else str(data), model, seed=opts.seed,
        labels_path=None if labels is None else str(labels), num_synthetic=max(opts.num_calibration, 2),
        shapes=opts.shapes, consts=opts.consts,
    )
    if eval_data is not None:
        holdout = load_calibration(str(eval_data), model, seed=opts.seed, shapes=opts.shapes, consts=opts.consts)
    else:
        calib, holdout = calib.split(opts.holdout_fraction, seed=opts.seed)
    if calib.num_samples > opts.num_calibration:
        calib = calib.subset(opts.num_calibration)
    return calib, holdout
