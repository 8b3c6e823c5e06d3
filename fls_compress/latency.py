"""onnxruntime latency of a model on one calibration batch: median of N timed runs after warm-up.

Both models of a comparison are timed with the same session options, provider and feed, alternating
runs, so that machine noise hits both alike. This is what the report quotes; it is a measurement on the
machine that ran the job, not a property of the file.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

from .runtime import ort_threads


def _session(model: onnx.ModelProto | str, providers: list[str]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if ort_threads():
        opts.intra_op_num_threads = ort_threads()
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=opts, providers=providers)


def compare_latency(
    original: onnx.ModelProto | str, compressed: onnx.ModelProto | str, feed: dict[str, np.ndarray],
    *, providers: list[str], runs: int = 20, warmup: int = 3,
) -> dict[str, object]:
    """Median and 90th-percentile milliseconds per run for both models, and their ratio."""
    sessions = {"original": _session(original, providers), "compressed": _session(compressed, providers)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(runs):
        for key, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, object] = {"provider": sessions["original"].get_providers()[0], "runs": runs,
                              "batch": int(next(iter(feed.values())).shape[0]) if feed else 0}
    for key, t in times.items():
        out[f"{key}_median_ms"] = float(np.median(t))
        out[f"{key}_p90_ms"] = float(np.percentile(t, 90))
    out["speedup"] = out["original_median_ms"] / max(out["compressed_median_ms"], 1e-9)  # type: ignore[operator]
    return out
