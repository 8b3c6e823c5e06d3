"""Check a converted module against onnxruntime on one calibration batch, before any pruning.

A converter that is wrong for a particular graph (or a torch kernel that refuses an input onnx2torch
did not anticipate, e.g. reflect padding of a 2-D tensor) must not surface as a crash in the middle
of pruning, or as silently wrong gradients. :func:`check_conversion` runs the original ONNX model
(onnxruntime, CPU) and the torch module on the same batch: a torch failure is an
:class:`~fls_compress.errors.UnsupportedModelError`; the largest relative L2 error over the outputs
is returned for the report, and a warning is logged above :data:`REL_TOLERANCE`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fls_compress.errors import UnsupportedModelError

_LOG = logging.getLogger(__name__)

REL_TOLERANCE = 1e-3


def check_conversion(
    model: onnx.ModelProto, forward, batch: dict[str, np.ndarray], feed: dict[str, np.ndarray]
) -> float | None:
    """Max relative L2 error of ``forward`` (the bridge, run on ``batch``) against onnxruntime on
    ``feed`` (the same samples as a complete onnxruntime feed for ``model``). Returns ``None`` when
    onnxruntime itself cannot run the model on the feed."""
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        _LOG.warning("conversion check skipped: onnxruntime cannot run the model on the data (%s)", str(exc).splitlines()[0])
        return None
    try:
        with torch.no_grad():
            outputs = forward({name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in batch.items()})
    except Exception as exc:  # noqa: BLE001 - any torch failure means the conversion is unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"the converted torch module fails on the calibration data: {type(exc).__name__}: {first}") from exc
    worst = 0.0
    for ref, got in zip(reference, outputs):
        ref = np.asarray(ref, dtype=np.float64)
        got = got.detach().to(torch.float64).numpy()
        if ref.shape != got.shape:
            _LOG.warning("converted module output shape %s differs from onnxruntime's %s", got.shape, ref.shape)
            return math.inf
        norm = float(np.linalg.norm(ref))
        diff = float(np.linalg.norm(got - ref))
        worst = max(worst, diff / norm if norm > 0 else diff)
    if worst > REL_TOLERANCE:
        _LOG.warning("converted module differs from onnxruntime by %.3g (relative L2) on calibration data", worst)
    return worst
