"""Verification of a compressed ONNX model against its original with onnxruntime.

Both models are run by onnxruntime (CPU provider, default session options, so the numbers are the
ones a user will see in deployment) on the same held-out samples, batch by batch, and compared
output by output. Statistics are accumulated in float64 so the report does not depend on the batch
size beyond onnxruntime's own numerics.

Per output the report holds

* ``max_abs_error``, ``mean_abs_error``: over all elements;
* ``relative_l2_error``: ``||compressed - original||_2 / ||original||_2`` over all elements
  (``None`` if the original output is identically zero while the compressed one is not);
* ``cosine_similarity``: between the flattened outputs of each sample, averaged over samples (two
  zero vectors count as 1, one zero vector as 0). Outputs whose axis 0 is not the batch axis are
  compared as one vector per batch.

Task-specific metrics (``task`` argument, else the original's ``metadata_props["task"]``, else
``"classification"`` when an output is ``[N, C]`` with ``C > 1``, else ``"generic"``):

* ``classification``, for every ``[N, C>1]`` output: ``top1_agreement`` (argmax equal), and
  ``accuracy_original`` / ``accuracy_compressed`` when the data has labels;
* ``detection`` (declared ``task=detect``, as Ultralytics writes it), for every ``[B, 4+C, N]``
  boxes+scores output: ``topk_box_agreement`` over the original's ``topk_boxes`` best anchors
  (see :mod:`fls_compress.verify_detection`);
* ``reconstruction`` (single-input models, outputs with as many features as the input): the input
  is the target. ``mse_original`` / ``mse_compressed`` compare the prediction to it; for Bernoulli
  outputs (metadata ``likelihood=bernoulli`` or an output named ``*logits*``) the prediction is
  ``sigmoid(logits)`` and ``bernoulli_nll_original`` / ``bernoulli_nll_compressed`` give the mean over
  samples of the NLL summed over features.

A task declared in the model's metadata that is none of these (foreign metadata, e.g. ``pose``) never
aborts verification: the generic metrics are computed, a warning is logged and the report says so in
``task_fallback``.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from fls_compress.errors import (
    InvalidDataError, InvalidModelError, InvalidOptionError, UnsupportedModelError, VerificationError, first_line,
)
from fls_compress.io.calibration import CalibrationData, graph_input_specs
from fls_compress.io.onnx_model import load_onnx, model_size_bytes
from fls_compress.verify_detection import TOP_K, is_box_output, topk_box_agreement

logger = logging.getLogger(__name__)

from fls_compress.task import TASKS, reproduces_input, resolve_task  # noqa: E402  (one task decision for pruning and verification)
"""Values accepted for ``task``."""


def _as_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model)


def _session(model: onnx.ModelProto, which: str, path: str | Path | None = None) -> ort.InferenceSession:
    """An onnxruntime session (the run's providers, :func:`~fls_compress.runtime.session_providers`) with default options, opened from ``path`` (the file ``model`` was read
    from) when given, else from the serialised proto; protobuf cannot serialise 2 GiB or more, so such a
    model without a file is written to a temporary directory with external data first."""
    from .runtime import session_providers

    providers = session_providers()
    try:
        if path is not None:
            return ort.InferenceSession(str(path), providers=providers)
        if model.ByteSize() < 2**31 - 1:
            return ort.InferenceSession(model.SerializeToString(), providers=providers)
        with tempfile.TemporaryDirectory(prefix="fls-verify-") as tmp:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, f"{tmp}/{which}.onnx", save_as_external_data=True, location=f"{which}.onnx.data")
            del copy
            return ort.InferenceSession(f"{tmp}/{which}.onnx", providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception hierarchy
        message = f"onnxruntime cannot load the {which} model: {first_line(exc)}"
        if "is not a registered function/op" in str(exc) or type(exc).__name__ == "NotImplemented":
            raise UnsupportedModelError(message) from exc  # a valid model with an operator onnxruntime lacks
        raise InvalidModelError(message) from exc


def _run(session: ort.InferenceSession, feed: dict[str, np.ndarray], which: str) -> list[np.ndarray]:
    try:
        return session.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        raise InvalidDataError(f"onnxruntime failed to run the {which} model on the data: {first_line(exc)}") from exc


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def bernoulli_nll(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-sample Bernoulli negative log-likelihood of ``target`` in [0, 1], summed over features.

    Uses the stable form ``max(z, 0) - z * x + log1p(exp(-|z|))`` (sigmoid cross-entropy with logits).
    Both arrays are ``[N, ...]``; the result is ``[N]`` in float64.
    """
    z = logits.reshape(len(logits), -1).astype(np.float64)
    x = target.reshape(len(target), -1).astype(np.float64)
    return (np.maximum(z, 0.0) - z * x + np.log1p(np.exp(-np.abs(z)))).sum(axis=1)


@dataclass
class _OutputStats:
    """Running sums for one output, so arbitrarily many batches use constant memory."""

    shape: tuple[int, ...] | None = None
    count: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_ref: float = 0.0
    cosine_sum: float = 0.0
    cosine_count: int = 0
    task_sums: dict[str, float] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)

    def add_task(self, key: str, total: float, count: int) -> None:
        self.task_sums[key] = self.task_sums.get(key, 0.0) + float(total)
        self.task_counts[key] = self.task_counts.get(key, 0) + int(count)

    def update(self, ref: np.ndarray, out: np.ndarray, batch_rows: int) -> None:
        a = ref.astype(np.float64)
        b = out.astype(np.float64)
        diff = np.abs(b - a)
        self.count += diff.size
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.sum_sq_diff += float(np.square(diff).sum())
        self.sum_sq_ref += float(np.square(a).sum())
        rows = batch_rows if a.ndim >= 1 and a.shape[0] == batch_rows else 1
        a2, b2 = a.reshape(rows, -1), b.reshape(rows, -1)
        norm_a, norm_b = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
        both_zero = (norm_a == 0) & (norm_b == 0)
        denom = np.where(norm_a * norm_b > 0, norm_a * norm_b, 1.0)
        cosine = np.where(both_zero, 1.0, (a2 * b2).sum(axis=1) / denom)
        self.cosine_sum += float(cosine.sum())
        self.cosine_count += rows

    def report(self) -> dict[str, Any]:
        if self.sum_sq_ref > 0:
            relative: float | None = math.sqrt(self.sum_sq_diff / self.sum_sq_ref)
        else:
            relative = 0.0 if self.sum_sq_diff == 0 else None
        result: dict[str, Any] = {
            "shape": list(self.shape) if self.shape is not None else None,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.count if self.count else 0.0,
            "relative_l2_error": relative,
            "cosine_similarity": self.cosine_sum / self.cosine_count if self.cosine_count else 1.0,
        }
        for key, total in self.task_sums.items():
            result[key] = total / self.task_counts[key] if self.task_counts[key] else None
        return result


def verify_models(
    original: onnx.ModelProto | str | Path,
    compressed: onnx.ModelProto | str | Path,
    data: CalibrationData,
    *,
    task: str | None = None,
    batch_size: int = 256,
    model_paths: tuple[str | Path | None, str | Path | None] = (None, None),
) -> dict[str, Any]:
    """Run ``original`` and ``compressed`` with onnxruntime on ``data`` and compare their outputs.

    Models may be protos or paths (loaded and checked with :func:`load_onnx`); ``model_paths`` names
    the files two protos were read from, so onnxruntime opens those (as it must at 2 GiB and above). Samples are fed in
    batches of ``batch_size`` (one at a time when the graph's leading dimension is a static 1, see
    :mod:`fls_compress.io.calibration`). Returns a JSON-ready
    dict (see the module docstring for the metrics)::

        {"task": ..., "num_samples": ..., "synthetic_data": ..., "data_source": ...,
         "model_size_bytes": {"original": ..., "compressed": ..., "ratio": ...},
         "outputs": {name: {"shape": [...], "max_abs_error": ..., ...}}}

    Raises :class:`InvalidModelError` if onnxruntime cannot load a model,
    :class:`VerificationError` if the two models' inputs or outputs differ in name or shape,
    :class:`InvalidDataError` if a model cannot run on the data and
    :class:`InvalidOptionError` for an unknown ``task`` or an impossible reconstruction task.
    """
    if batch_size < 1:
        raise InvalidOptionError(f"batch size must be at least 1, got {batch_size}")
    original_model, compressed_model = _as_model(original), _as_model(compressed)
    ref_path = model_paths[0] if isinstance(original, onnx.ModelProto) else original
    new_path = model_paths[1] if isinstance(compressed, onnx.ModelProto) else compressed
    ref_session = _session(original_model, "original", ref_path)
    new_session = _session(compressed_model, "compressed", new_path)
    ref_inputs = sorted(i.name for i in ref_session.get_inputs())
    new_inputs = sorted(i.name for i in new_session.get_inputs())
    if ref_inputs != new_inputs:
        raise VerificationError(f"the models have different inputs: original {ref_inputs}, compressed {new_inputs}")
    output_names = [o.name for o in ref_session.get_outputs()]
    new_output_names = [o.name for o in new_session.get_outputs()]
    if output_names != new_output_names:
        raise VerificationError(
            f"the models have different outputs: original {output_names}, compressed {new_output_names}"
        )

    metadata = _metadata(original_model)
    stats = {name: _OutputStats() for name in output_names}
    resolved_task: str | None = None
    task_fallback: dict[str, str] | None = None
    reconstruction_outputs: dict[str, bool] = {}  # output name -> is Bernoulli logits
    input_names = list(data.inputs)
    if any(spec.one_sample_at_a_time for spec in graph_input_specs(original_model)):
        batch_size = 1  # the graph has a static leading dimension of 1

    for feed, labels in data.labeled_batches(batch_size):
        first = input_names[0]
        rows = feed[first].shape[data.batch_axes.get(first, 0)]
        ref_outputs = _run(ref_session, feed, "original")
        new_outputs = _run(new_session, feed, "compressed")
        if resolved_task is None:
            inputs_now = {k: v for k, v in feed.items() if k in data.inputs}
            resolved_task, _reason, task_fallback = resolve_task(
                task, metadata, [tuple(out.shape) for out in ref_outputs],
                reconstructs=reproduces_input(inputs_now, ref_outputs[0]), has_labels=labels is not None,
            )
            if resolved_task == "reconstruction":
                reconstruction_outputs = _reconstruction_outputs(
                    output_names, ref_outputs, feed, input_names, metadata, explicit=task is not None
                )
        for name, ref, out in zip(output_names, ref_outputs, new_outputs):
            if ref.shape != out.shape:
                raise VerificationError(
                    f"output '{name}' has shape {ref.shape} in the original but {out.shape} in the compressed model"
                )
            stat = stats[name]
            if stat.shape is None:
                stat.shape = tuple(int(d) for d in ref.shape[1:])
            stat.update(ref, out, rows)
            if resolved_task == "classification" and ref.ndim == 2 and ref.shape[1] > 1:
                _add_classification(stat, ref, out, labels)
            if resolved_task == "detection" and is_box_output(ref.shape):
                k = min(TOP_K, ref.shape[2])
                stat.add_task("topk_box_agreement", topk_box_agreement(ref, out, k).sum(), ref.shape[0])
                stat.add_task("topk_boxes", k * ref.shape[0], ref.shape[0])  # k, the same for every sample
            if name in reconstruction_outputs:
                _add_reconstruction(stat, ref, out, feed[input_names[0]], reconstruction_outputs[name])

    size_original = model_size_bytes(original_model)
    size_compressed = model_size_bytes(compressed_model)
    report: dict[str, Any] = {
        "task": resolved_task,
        "num_samples": data.num_samples,
        "synthetic_data": data.synthetic,
        "data_source": data.source,
        "model_size_bytes": {
            "original": size_original,
            "compressed": size_compressed,
            "ratio": size_compressed / size_original if size_original else None,
        },
        "outputs": {name: stat.report() for name, stat in stats.items()},
    }
    if task_fallback is not None:
        report["task_fallback"] = task_fallback
    logger.debug("verification report: %s", report)
    return report


def _reconstruction_outputs(
    output_names: list[str],
    outputs: list[np.ndarray],
    feed: dict[str, np.ndarray],
    input_names: list[str],
    metadata: dict[str, str],
    *,
    explicit: bool,
) -> dict[str, bool]:
    """Outputs that reconstruct the (single) input, mapped to whether they are Bernoulli logits."""
    matching: dict[str, bool] = {}
    if len(input_names) == 1:
        target = feed[input_names[0]]
        features = int(np.prod(target.shape[1:]))
        bernoulli_model = metadata.get("likelihood", "").lower() == "bernoulli"
        for name, out in zip(output_names, outputs):
            if out.ndim >= 1 and out.shape[0] == target.shape[0] and int(np.prod(out.shape[1:])) == features:
                matching[name] = bernoulli_model or "logit" in name.lower()
    if not matching:
        message = "reconstruction metrics need a single-input model with an output the size of its input"
        if explicit:
            raise InvalidOptionError(f"task 'reconstruction': {message}")
        logger.warning("model declares task=reconstruction but %s; skipping them", message)
    return matching


def _add_classification(stat: _OutputStats, ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> None:
    ref_top, new_top = ref.argmax(axis=1), out.argmax(axis=1)
    stat.add_task("top1_agreement", np.count_nonzero(ref_top == new_top), len(ref_top))
    if labels is not None:
        stat.add_task("accuracy_original", np.count_nonzero(ref_top == labels), len(labels))
        stat.add_task("accuracy_compressed", np.count_nonzero(new_top == labels), len(labels))


def _add_reconstruction(
    stat: _OutputStats, ref: np.ndarray, out: np.ndarray, target: np.ndarray, bernoulli: bool
) -> None:
    rows = len(target)
    x = target.reshape(rows, -1).astype(np.float64)
    for suffix, pred in (("original", ref), ("compressed", out)):
        z = pred.reshape(rows, -1).astype(np.float64)
        if bernoulli:
            stat.add_task(f"bernoulli_nll_{suffix}", bernoulli_nll(z, x).sum(), rows)
            z = _sigmoid(z)
        stat.add_task(f"mse_{suffix}", np.square(z - x).sum(), x.size)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summarize(report: dict[str, Any]) -> str:
    """A short human-readable, multi-line summary of a :func:`verify_models` report (for stderr)."""
    sizes = report["model_size_bytes"]
    lines = [
        f"verified on {report['num_samples']} {'synthetic ' if report.get('synthetic_data') else ''}"
        f"samples (task: {report['task']})",
        f"model size: {sizes['original'] / 1e6:.2f} MB -> {sizes['compressed'] / 1e6:.2f} MB "
        f"({_fmt(sizes['ratio'], '.3f')}x)",
    ]
    for name, out in report["outputs"].items():
        lines.append(
            f"output '{name}': max|err| {out['max_abs_error']:.3g}, mean|err| {out['mean_abs_error']:.3g}, "
            f"rel L2 {_fmt(out['relative_l2_error'], '.3g')}, cosine {out['cosine_similarity']:.6f}"
        )
        if "top1_agreement" in out:
            text = f"  top-1 agreement {100 * out['top1_agreement']:.2f}%"
            if "accuracy_original" in out:
                text += (
                    f"; accuracy {100 * out['accuracy_original']:.2f}% -> {100 * out['accuracy_compressed']:.2f}%"
                )
            lines.append(text)
        if "topk_box_agreement" in out:
            lines.append(
                f"  top-{int(out['topk_boxes'])} box agreement (IoU >= 0.5, same class) {100 * out['topk_box_agreement']:.2f}%"
            )
        if "mse_original" in out:
            text = "  "
            if "bernoulli_nll_original" in out:
                text += (
                    f"Bernoulli NLL {out['bernoulli_nll_original']:.3f} -> {out['bernoulli_nll_compressed']:.3f}; "
                )
            text += f"MSE {out['mse_original']:.5f} -> {out['mse_compressed']:.5f}"
            lines.append(text)
    return "\n".join(lines)
