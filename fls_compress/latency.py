"""onnxruntime latency of a compressed model against its original, and the kernels onnxruntime runs.

The report's ``latency`` block (:func:`latency_block`) times both models in the same process with the
same session options (provider, intra-op thread count, graph optimisation level), after warm-up runs,
alternating the two models run by run so that machine noise hits both alike; at batch 1 and at the
evaluation batch (:data:`EVAL_BATCH` samples, or all held-out samples when fewer). Each timing is the
median of ``runs`` runs with the 10th and 90th percentiles as its spread. This is a measurement on the
machine that ran the job, not a property of the file.

The kernel census (:func:`kernel_census`) is read from the graph onnxruntime actually executes: the
timed session writes its optimised graph (``SessionOptions.optimized_model_filepath``) and the census
counts its node types, so the report says whether the QDQ nodes were fused into integer kernels
(QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat, MatMulNBits, ...) or left a float
Conv/MatMul/Gemm running on dequantised tensors.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import ort_threads

log = logging.getLogger(__name__)

#: samples per call of the second timed batch (capped by the held-out samples)
EVAL_BATCH = 64
#: warm-up runs of each model before timing
WARMUP = 3

#: node types of an optimised onnxruntime graph that compute a layer in integer arithmetic
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "QGemm",
    "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax",
    "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "GatherBlockQuantized", "MatMulBnb4",
})
#: node types that compute a layer's product in floating point
FLOAT_LAYER_KERNELS = frozenset({"Conv", "ConvTranspose", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})

ModelRef = onnx.ModelProto | str | os.PathLike[str]


def session_options(optimized_path: str | None = None) -> ort.SessionOptions:
    """The options every timed session uses: the run's intra-op threads (``--threads``, else onnxruntime's
    default), full graph optimisation (onnxruntime's default, what a deployment gets)."""
    opts = ort.SessionOptions()
    if ort_threads():
        opts.intra_op_num_threads = ort_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # serialising an NCHWc-optimised graph warns that it is machine specific
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    return opts


def _open(model: ModelRef, providers: list[str], optimized_path: str | None = None) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, sess_options=session_options(optimized_path), providers=providers)


def census_of(model: onnx.ModelProto) -> dict[str, Any]:
    """Node types of a graph (subgraphs included), split into integer and float layer kernels."""
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return {
        "op_types": dict(sorted(counts.items())),
        "integer_kernels": {k: v for k, v in sorted(counts.items()) if k in INTEGER_KERNELS},
        "float_layer_kernels": {k: v for k, v in sorted(counts.items()) if k in FLOAT_LAYER_KERNELS},
        "quantize_nodes": counts.get("QuantizeLinear", 0) + counts.get("DynamicQuantizeLinear", 0),
        "dequantize_nodes": counts.get("DequantizeLinear", 0),
    }


def _open_with_census(model: ModelRef, providers: list[str], tmp: str, which: str) -> tuple[ort.InferenceSession, dict | None]:
    """A timed session and the census of the graph it optimised (``None`` with a warning if onnxruntime
    could not write that graph, e.g. above protobuf's 2 GiB)."""
    path = os.path.join(tmp, f"{which}.optimized.onnx")
    try:
        session = _open(model, providers, path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        log.warning("kernel census of the %s model not available (onnxruntime could not write its optimised "
                    "graph: %s); timing it without", which, str(exc).splitlines()[0] if str(exc) else exc)
        return _open(model, providers), None
    try:
        census = census_of(onnx.load(path, load_external_data=False))
    except Exception as exc:  # noqa: BLE001
        log.warning("kernel census of the %s model not available: %s", which, exc)
        census = None
    return session, census


def kernel_census(model: ModelRef, providers: list[str] | None = None) -> dict[str, Any]:
    """The census (:func:`census_of`) of the graph onnxruntime optimises ``model`` into."""
    with tempfile.TemporaryDirectory(prefix="fls-census-") as tmp:
        _, census = _open_with_census(model, providers or ["CPUExecutionProvider"], tmp, "model")
    if census is None:
        raise RuntimeError("onnxruntime did not write the optimised graph")
    return census


def _spread(times: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90))}


def time_sessions(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], *, runs: int,
                  warmup: int = WARMUP) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 milliseconds per run of each session on ``feed``, alternating the sessions."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(runs):
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: _spread(t) for k, t in times.items()}


def _rows(feed: dict[str, np.ndarray]) -> int:
    first = next((v for v in feed.values() if np.ndim(v) > 0), None)
    return int(first.shape[0]) if first is not None else 1


def measure(original: ModelRef, compressed: ModelRef, feeds: Iterable[dict[str, np.ndarray]], *,
            providers: list[str], runs: int, warmup: int = WARMUP) -> dict[str, Any]:
    """The latency block for explicit feeds (one timed batch each); see :func:`latency_block`."""
    with tempfile.TemporaryDirectory(prefix="fls-latency-") as tmp:
        s_orig, c_orig = _open_with_census(original, providers, tmp, "original")
        s_new, c_new = _open_with_census(compressed, providers, tmp, "compressed")
    sessions = {"original": s_orig, "compressed": s_new}
    batches = []
    for feed in feeds:
        timed = time_sessions(sessions, feed, runs=runs, warmup=warmup)
        speedup = timed["original"]["median_ms"] / max(timed["compressed"]["median_ms"], 1e-9)
        batches.append({"batch": _rows(feed), **timed, "speedup": speedup})
    block: dict[str, Any] = {
        "measured": True,
        "providers": s_new.get_providers(),
        "intra_op_threads": ort_threads() or "onnxruntime default",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "runs": runs, "warmup": warmup,
        "batches": batches,
        "kernels": {"original": c_orig, "compressed": c_new},
    }
    block["verdict"] = verdict(block)
    return block


def verdict(block: dict[str, Any]) -> str:
    """One line: ``1.84x faster on CPUExecutionProvider, batch 1; 1.52x faster at batch 64``."""
    parts = []
    for i, b in enumerate(block["batches"]):
        s = b["speedup"]
        how = f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x slower"
        parts.append(f"{how} on {block['providers'][0]}, batch {b['batch']}" if i == 0 else f"{how} at batch {b['batch']}")
    return "; ".join(parts) if parts else "no batch timed"


def latency_block(original: ModelRef, compressed: ModelRef, data: Any, *, providers: list[str], runs: int,
                  warmup: int = WARMUP, eval_batch: int = EVAL_BATCH) -> dict[str, Any]:
    """Time ``original`` and ``compressed`` (protos or file paths) on the first sample of ``data`` (a
    :class:`~fls_compress.io.calibration.CalibrationData`) and on its first ``eval_batch`` samples, and
    census the kernels onnxruntime runs for each. Logs the verdict (stderr) and returns::

        {"measured": true, "providers": [...], "intra_op_threads": ..., "runs": N, "warmup": 3,
         "batches": [{"batch": 1, "original": {"median_ms", "p10_ms", "p90_ms"}, "compressed": {...},
                      "speedup": original median / compressed median}, {"batch": 64, ...}],
         "kernels": {"original": census, "compressed": census}, "verdict": "1.84x faster on ..."}
    """
    feeds = [next(iter(data.batches(1)))]
    big = next(iter(data.batches(eval_batch)), None)
    if big is not None and _rows(big) > 1:
        feeds.append(big)
    block = measure(original, compressed, feeds, providers=providers, runs=runs, warmup=warmup)
    log.info("latency: %s", block["verdict"])
    return block


def not_measured(reason: str) -> dict[str, Any]:
    """The latency block of a run that did not time the models (``--no-latency``)."""
    return {"measured": False, "reason": reason}


def compare_latency(original: ModelRef, compressed: ModelRef, feed: dict[str, np.ndarray], *,
                    providers: list[str], runs: int = 20, warmup: int = WARMUP) -> dict[str, object]:
    """Median and 90th-percentile milliseconds per run of both models on one feed, and their ratio
    (flat form, for benchmarks)."""
    sessions = {"original": _open(original, providers), "compressed": _open(compressed, providers)}
    timed = time_sessions(sessions, feed, runs=runs, warmup=warmup)
    out: dict[str, object] = {"provider": sessions["original"].get_providers()[0], "runs": runs, "batch": _rows(feed)}
    for key, t in timed.items():
        out[f"{key}_median_ms"] = t["median_ms"]
        out[f"{key}_p90_ms"] = t["p90_ms"]
    out["speedup"] = timed["original"]["median_ms"] / max(timed["compressed"]["median_ms"], 1e-9)
    return out
