"""Check a converted module against onnxruntime on one calibration batch, before any pruning.

A converter that is wrong for a particular graph (or a torch kernel that refuses an input onnx2torch
did not anticipate, e.g. reflect padding of a 2-D tensor) must not surface as a crash in the middle
of pruning, or as silently wrong gradients. :func:`check_conversion` runs the original ONNX model
(onnxruntime, CPU) and the torch module on the same batch: a torch failure is an
:class:`~fls_compress.errors.UnsupportedModelError`; the largest relative L2 error over the outputs
is returned for the report. :func:`gate_conversion` decides what an error above the tolerance means
(:mod:`.divergence` locates the node responsible): stop, or continue with a warning.
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
"""Default of ``--conversion-tol``."""


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
    return worst


def gate_conversion(error: float, tolerance: float, locate, *, on_mismatch: str) -> dict[str, object]:
    """What a conversion error above ``tolerance`` means, as report fields (empty when within it).

    ``locate()`` returns :func:`~fls_compress.bridge.divergence.locate_divergence`'s verdict. When
    every diverging node is onnxruntime's kernel deviating from the exact spec value while the
    conversion matches the spec, the torch graph is faithful: a warning, and the nodes in
    ``onnxruntime_kernel_deviations``. Otherwise the conversion is wrong somewhere: an
    :class:`UnsupportedModelError` naming the first diverging node, unless ``on_mismatch`` is
    ``"warn"`` (``--allow-conversion-mismatch``, or a method that reads only the weights), which logs
    a warning and sets ``mismatch_allowed``.
    """
    if error is None or error <= tolerance:
        return {}
    verdict = locate()
    fields: dict[str, object] = {"first_diverging_node": verdict["first"]}
    first = verdict["first"]
    if first is None and verdict["explained"]:
        nodes = ", ".join(f"{e['op_type']} node {e['node']!r} (onnxruntime {e['onnxruntime_vs_spec']:.2g} from the spec, "
                          f"torch {e['torch_vs_spec']:.2g})" for e in verdict["explained"])
        _LOG.warning("converted module differs from onnxruntime by %.3g (relative L2) on calibration data only where "
                     "onnxruntime's kernel departs from the exact spec value and the conversion does not: %s", error, nodes)
        fields["onnxruntime_kernel_deviations"] = verdict["explained"]
        fields["faithful"] = True
        return fields
    where = (f"first at {first['op_type']} node {first['node']!r} (output {first['output']!r}, relative error "
             f"{first['rel_error']:.3g} with agreeing inputs)" if first is not None else
             "the diverging node could not be located")
    message = (f"the converted torch graph differs from onnxruntime by {error:.3g} (relative L2, above the tolerance "
               f"{tolerance:g}) on the calibration batch, {where}")
    if on_mismatch != "warn":
        raise UnsupportedModelError(message + "; pass --allow-conversion-mismatch to use it anyway")
    _LOG.warning("%s; used anyway", message)
    fields["mismatch_allowed"] = True
    fields["faithful"] = False
    return fields
