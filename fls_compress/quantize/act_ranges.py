"""Activation ranges for static int8 quantization, from calibration samples.

Four methods (``act_calibration``), each over all values of a tensor on the calibration samples:

* ``minmax``: [min, max] (Jacob et al. 2018, sec. 3; onnxruntime's ``CalibrationMethod.MinMax``);
* ``percentile[:P]``: [the (100 - P)-th, the P-th percentile] (default P = 99.99), read off a
  2048-bin histogram over [min, max] with linear interpolation inside the bin, so rare outliers do not
  stretch the grid (McKinstry et al. 2019, sec. 3.2; Wu et al. 2020, "Integer quantization for deep
  learning inference", sec. 4.1 "percentile calibration");
* ``entropy``: the threshold T of |x| that minimises KL(P || Q) between the 2048-bin histogram of |x|
  clipped at T (clipped mass added to the last bin) and its quantisation to the grid's levels
  (255 for one-signed data, 128 per side otherwise), each level's mass spread over its non-empty
  bins (Migacz 2017, "8-bit inference with TensorRT"; Wu et al. 2020, sec. 4.1); the range is
  [max(min, -T), min(max, T)]. Exact zeros (ReLU outputs, padding) are left out of that histogram:
  they are exact on every grid (the zero point), and their spike would otherwise dominate the KL;
* ``mse``: the range alpha * [min(lo, 0), max(hi, 0)], alpha in {1, 0.99, ..., 0.30}, that minimises the
  expected squared quantisation error over the tensor's values, estimated from a 2048-bin histogram as
  rounding noise Delta^2 / 12 per value inside the range plus the squared clipping distance of each value
  outside it (Banner, Nahshan, Soudry 2019, "Post training 4-bit quantization of convolutional networks
  for rapid-deployment", eq. 3-5; Nagel et al. 2021, "A white paper on neural network quantization",
  sec. 3.5 "MSE-based range setting"). Exact zeros are left out (exact on every grid).

Every range is widened to contain 0 (so zero padding and ReLU zeros are exact) by :func:`uint8_params`.
Percentile, entropy and mse need a second pass over the samples (the histogram's span comes from the first).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..configs.quantize import parse_calibration
from ..io.activations import iter_activations

BINS = 2048

__all__ = ["activation_ranges", "entropy_threshold", "histogram_quantile", "mse_range", "parse_calibration",
           "uint8_params"]


def _minmax(model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[str], chunk: int):
    lo = {v: np.inf for v in values}
    hi = {v: -np.inf for v in values}
    for acts in iter_activations(model, feeds, values, chunk):
        for v in values:
            a = np.asarray(acts[v])
            if a.size:
                lo[v] = min(lo[v], float(a.min()))
                hi[v] = max(hi[v], float(a.max()))
    return {v: (lo[v] if np.isfinite(lo[v]) else 0.0, hi[v] if np.isfinite(hi[v]) else 0.0) for v in values}


def _histograms(model, feeds, values, chunk, spans: dict[str, tuple[float, float]], absolute: bool,
                nonzero: bool = False):
    hist = {v: np.zeros(BINS, dtype=np.float64) for v in values}
    for acts in iter_activations(model, feeds, values, chunk):
        for v in values:
            a = np.asarray(acts[v], dtype=np.float64).reshape(-1)
            lo, hi = spans[v]
            if absolute:  # exact zeros (ReLU, padding) sit on every grid's zero point: no error to weigh
                a = np.abs(a[a != 0])
            elif nonzero:
                a = a[a != 0]
            if a.size and hi > lo:
                hist[v] += np.histogram(a, bins=BINS, range=(lo, hi))[0]
    return hist


def histogram_quantile(hist: np.ndarray, lo: float, hi: float, q: float) -> float:
    """The q-quantile (0..1) of the values a histogram over [lo, hi] counts, interpolated linearly in its bin."""
    total = hist.sum()
    if total <= 0 or hi <= lo:
        return lo
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    target = q * total
    i = int(np.clip(np.searchsorted(cum, target, side="left") - 1, 0, len(hist) - 1))
    inside = (target - cum[i]) / hist[i] if hist[i] > 0 else 0.0
    width = (hi - lo) / len(hist)
    return float(lo + (i + np.clip(inside, 0.0, 1.0)) * width)


def entropy_threshold(hist: np.ndarray, amax: float, levels: int) -> float:
    """Migacz's KL-divergence threshold for a histogram of |x| over [0, amax] (see the module doc)."""
    bins = len(hist)
    if hist.sum() <= 0 or amax <= 0:
        return amax
    best_i, best_kl = bins, np.inf
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = mass in bins >= i
    for i in range(min(levels, bins), bins + 1):
        p = hist[:i].copy()
        p[i - 1] += tail[i]
        # quantise the i bins into `levels` groups; each group's mass spread over its non-empty bins
        edges = (np.arange(levels + 1) * i) // levels
        sums = np.add.reduceat(hist[:i], edges[:-1]) if i >= levels else hist[:i]
        nonzero = (hist[:i] > 0).astype(np.float64)
        counts = np.add.reduceat(nonzero, edges[:-1])
        group = np.repeat(np.arange(levels), np.diff(edges))
        q = np.where(nonzero > 0, sums[group] / np.maximum(counts[group], 1.0), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum <= 0:
            continue
        pn, qn = p / p_sum, q / q_sum
        mask = pn > 0
        # a bin with mass in P but none in Q (only the clipped last bin can be one): smoothed as TensorRT does
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl - 1e-12:
            best_i, best_kl = i, kl
    return best_i * amax / bins


ALPHAS = np.round(np.arange(1.0, 0.295, -0.01), 2)


def mse_range(hist: np.ndarray, lo: float, hi: float, alphas: np.ndarray = ALPHAS) -> tuple[float, float]:
    """The clipped range alpha * [min(lo, 0), max(hi, 0)] of least expected squared uint8 quantisation
    error for the values a histogram over [lo, hi] counts (see the module doc)."""
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    if hist.sum() <= 0 or hi <= lo or hi0 <= lo0:
        return lo, hi
    width = (hi - lo) / len(hist)
    centers = lo + (np.arange(len(hist)) + 0.5) * width
    best, best_err = 1.0, np.inf
    for a in alphas:
        a_lo, a_hi = a * lo0, a * hi0
        step = (a_hi - a_lo) / 255.0
        above, below = centers > a_hi, centers < a_lo
        inside = ~(above | below)
        err = float(hist[inside].sum()) * step * step / 12.0
        err += float((hist[above] * (centers[above] - a_hi) ** 2).sum() + (hist[below] * (centers[below] - a_lo) ** 2).sum())
        if err < best_err * (1.0 - 1e-12):  # ties keep the wider range
            best, best_err = float(a), err
    return max(lo, best * lo0), min(hi, best * hi0)


def activation_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[str], method: str = "minmax",
                      *, chunk: int = 64) -> dict[str, tuple[float, float]]:
    """(low, high) of each named tensor over the calibration feeds with ``method`` (see the module doc)."""
    kind, p = parse_calibration(method)
    ranges = _minmax(model, feeds, values, chunk)
    if kind == "minmax" or not values:
        return ranges
    if kind == "mse":
        hist = _histograms(model, feeds, values, chunk, ranges, absolute=False, nonzero=True)
        return {v: mse_range(hist[v], *ranges[v]) for v in values}
    if kind == "percentile":
        hist = _histograms(model, feeds, values, chunk, ranges, absolute=False)
        out = {}
        for v in values:
            lo, hi = ranges[v]
            out[v] = (histogram_quantile(hist[v], lo, hi, 1.0 - p / 100.0), histogram_quantile(hist[v], lo, hi, p / 100.0))
        return out
    spans = {v: (0.0, max(abs(lo), abs(hi))) for v, (lo, hi) in ranges.items()}
    hist = _histograms(model, feeds, values, chunk, spans, absolute=True)
    out = {}
    for v in values:
        lo, hi = ranges[v]
        levels = 255 if lo >= 0.0 or hi <= 0.0 else 128
        t = entropy_threshold(hist[v], spans[v][1], levels)
        out[v] = (max(lo, -t), min(hi, t))
    return out


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point for the range [min(lo, 0), max(hi, 0)] (Jacob et al. 2018, eq. 1)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not scale > 0:
        scale = np.float32(1.0)
    zero = np.uint8(np.clip(np.round(-lo / float(scale)), 0, 255))
    return scale, zero
