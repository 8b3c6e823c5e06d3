"""Checks that stop a job before any work, or fail it after verification (each a one-line error with its
exit code): the original must load in onnxruntime and hold finite prunable weights (exit 3/4), give finite
outputs on the data (exit 5), a factorisation failure is a property of the model (exit 4), and the
verification gates ``--min-agreement``, ``--max-rel-error``, ``--min-cosine`` and non-finite outputs (exit 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .configs import RunOptions
from .errors import UnsupportedModelError, first_line


def numerically_guarded(fn, *args: Any) -> Any:
    """Run a compression stage; a matrix factorisation that fails (``torch.linalg.LinAlgError``: eigh or
    Cholesky of a curvature factor that is not finite or hopelessly ill-conditioned, e.g. weights of
    1e34) is a property of this model and data, so it is exit 4 with one line, not an internal error."""
    import torch

    try:
        return fn(*args)
    except torch.linalg.LinAlgError as exc:
        first = first_line(exc)
        raise UnsupportedModelError(
            f"the curvature of this model could not be factorised ({first}); check the scale of its weights and data"
        ) from exc


def check_original(proto: onnx.ModelProto, path: Path | None) -> Any:
    """Fail before any work on what would only fail later: onnxruntime must load the original (every
    result is verified with it; a model it refuses is exit 3, one with an operator it lacks exit 4), and
    the prunable weights must be finite (NaN/Inf weights make every saliency meaningless). Returns the
    onnxruntime session of the original for :func:`check_outputs_finite`."""
    from onnx import numpy_helper

    from .errors import InvalidModelError
    from .io.onnx_model import prunable_initializers
    from .verification import _session  # the one place that maps onnxruntime's load errors to exit codes

    session = _session(proto, "original", path)
    inits = {t.name: t for t in proto.graph.initializer}
    base = str(path.parent) if path is not None else ""
    for site in prunable_initializers(proto):
        if site.name in inits and not np.isfinite(numpy_helper.to_array(inits[site.name], base)).all():
            raise InvalidModelError(f"prunable weight '{site.name}' holds NaN or Inf values; fix the model first")
    return session


def check_outputs_finite(session: Any, datasets: dict[str, Any], batch_size: int = 32) -> None:
    """The original model must give finite outputs on the first batch of each data set: finite inputs
    that overflow it (or weights that do) leave nothing to fit a curvature to or to verify against.
    A failure to run is bad data too (exit 5), as in verification."""
    from .errors import InvalidDataError

    names = [o.name for o in session.get_outputs()]
    for role, data in datasets.items():
        feed = next(iter(data.batches(batch_size)), None)
        if feed is None:
            continue
        try:
            outputs = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception hierarchy
            first = first_line(exc)
            raise InvalidDataError(f"onnxruntime cannot run the original model on the {role} data: {first}") from exc
        for name, out in zip(names, outputs):
            arr = np.asarray(out)
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise InvalidDataError(
                    f"the original model's output '{name}' is not finite (NaN/Inf) on the {role} data ({data.source}); "
                    "the inputs (or weights) overflow it: check their scale"
                )


def non_finite_outputs(verification: dict[str, Any]) -> str | None:
    """A verification that compared NaN/Inf outputs proves nothing: it fails (exit 6) like a gate."""
    for name, out in verification["outputs"].items():
        for key, value in out.items():
            if isinstance(value, float) and not np.isfinite(value):
                return (f"output '{name}' is not finite (NaN/Inf) in the original or the compressed model on the "
                        f"verification data ({key} is {value}); check the scale of the data")
    return None


def check_gates(verification: dict[str, Any], opts: RunOptions) -> str | None:
    """The first verification gate that fails (``--min-agreement``, ``--max-rel-error``, ``--min-cosine``)."""
    for name, out in verification["outputs"].items():
        agreement = out.get("top1_agreement")
        if opts.min_agreement is not None:
            if agreement is None and not any(o.get("top1_agreement") is not None for o in verification["outputs"].values()):
                return ("--min-agreement needs a classifier output ([N, C] logits); "
                        "use --max-rel-error or --min-cosine for this model")
            if agreement is not None and agreement < opts.min_agreement:
                return f"top-1 agreement on output '{name}' is {agreement:.4f}, below --min-agreement {opts.min_agreement}"
        rel = out.get("relative_l2_error")
        if opts.max_rel_error is not None and (rel is None or not np.isfinite(rel) or rel > opts.max_rel_error):
            return f"relative L2 error on output '{name}' is {rel}, above --max-rel-error {opts.max_rel_error}"
        cos = out.get("cosine_similarity")
        if opts.min_cosine is not None and (cos is None or not np.isfinite(cos) or cos < opts.min_cosine):
            return f"cosine similarity on output '{name}' is {cos}, below --min-cosine {opts.min_cosine}"
    return None
