"""Static int8 activation QDQ on top of quantised weights (``activations="int8"``).

The input activation of every layer whose weight was quantised gets a QuantizeLinear ->
DequantizeLinear pair (uint8, asymmetric, per tensor; Jacob et al. 2018, eq. 1 and 7), so a QDQ-aware
runtime can run the layer in integer arithmetic. Ranges come from min/max calibration (onnxruntime's
``CalibrationMethod.MinMax`` rule) over the calibration samples, taken on the model that already has
the quantised weights (the activations the integer layers will actually see); the range is widened to
contain 0 so that zero padding and ReLU zeros are exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..io.activations import iter_activations

log = logging.getLogger(__name__)


def minmax_ranges(model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[str],
                  chunk: int = 64) -> dict[str, tuple[float, float]]:
    """(min, max) of each named tensor over all calibration samples."""
    lo = {v: np.inf for v in values}
    hi = {v: -np.inf for v in values}
    for acts in iter_activations(model, feeds, values, chunk):
        for v in values:
            a = np.asarray(acts[v])
            if a.size:
                lo[v] = min(lo[v], float(a.min()))
                hi[v] = max(hi[v], float(a.max()))
    return {v: (lo[v] if np.isfinite(lo[v]) else 0.0, hi[v] if np.isfinite(hi[v]) else 0.0) for v in values}


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point for the range [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    if not scale > 0:
        scale = np.float32(1.0)
    zero = np.uint8(np.clip(np.round(-lo / float(scale)), 0, 255))
    return scale, zero


def add_activation_qdq(
    model: onnx.ModelProto,
    calib_inputs: dict[str, np.ndarray],
    consumers: list[tuple[onnx.NodeProto, int]],
    *,
    num_samples: int = 512,
    chunk: int = 64,
) -> tuple[onnx.ModelProto, dict[str, float | str]]:
    """A copy of ``model`` with Q/DQ on input ``position`` of each listed consumer node.

    Consumers are given as (node as it appears in ``model``, input position of its activation); a
    tensor read by several of them gets one Q/DQ pair.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    targets: dict[str, list[tuple[int, int]]] = {}
    missing = []
    for node, pos in consumers:
        idx = next((i for i, n in enumerate(graph.node) if n == node), None)
        if idx is None:  # rewritten by an opset conversion
            missing.append(node.name or node.op_type)
            continue
        targets.setdefault(node.input[pos], []).append((idx, pos))
    if missing:
        log.warning("activation QDQ: %d layer(s) were rewritten by the opset conversion and keep float inputs: %s",
                    len(missing), ", ".join(missing))
    feeds = {k: np.asarray(v)[:num_samples] for k, v in calib_inputs.items()}
    ranges = minmax_ranges(model, feeds, list(targets), chunk)
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    pairs: dict[str, list[onnx.NodeProto]] = {}
    for value, uses in targets.items():
        scale, zero = uint8_params(*ranges[value])
        names = []
        for suffix in ("scale", "zero_point", "quantized", "dequantized"):
            base, name, i = f"{value}_act_{suffix}", f"{value}_act_{suffix}", 1
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            taken.add(name)
            names.append(name)
        s_name, z_name, q_name, dq_name = names
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zero, dtype=np.uint8), z_name))
        pairs[value] = [helper.make_node("QuantizeLinear", [value, s_name, z_name], [q_name], name=q_name + "_Q"),
                        helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name], name=dq_name + "_DQ")]
        for idx, pos in uses:
            graph.node[idx].input[pos] = dq_name
    # place each pair right after the producer of its tensor (graph inputs: at the start)
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for value, pair in pairs.items():
        if value not in producers:
            nodes.extend(pair)
    for i, n in enumerate(graph.node):
        nodes.append(n)
        for o in n.output:
            if o in pairs:
                nodes.extend(pairs[o])
    del graph.node[:]
    graph.node.extend(nodes)
    info: dict[str, float | str] = {
        "activation_qdq_tensors": float(len(pairs)),
        "activation_qdq_skipped": ", ".join(missing),
        "activation_calibration": f"minmax over {int(next(iter(feeds.values())).shape[0])} samples, uint8 per tensor",
    }
    return out, info
