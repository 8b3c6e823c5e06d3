"""Static int8 activation QDQ on top of quantised weights (``activations="int8"``), placed so that
onnxruntime's graph optimiser fuses each quantised layer into an integer kernel.

Activations are uint8, asymmetric, per tensor (Jacob et al. 2018, eq. 1 and 7) and weights int8
symmetric per channel (the U8S8 form onnxruntime's x86/ARM integer GEMMs run fastest). onnxruntime
replaces a node group ``DequantizeLinear`` inputs -> layer [-> ``QuantizeLinear``] by one integer kernel
when the group is complete (its QDQ selectors): Conv needs DQ on the input, the weight and the bias
(int32) and Q on the output (-> QLinearConv); Gemm DQ on A, B and an int32 bias, the output Q optional
(-> QGemm); MatMul DQ on both inputs, the output Q optional (-> QLinearMatMul / MatMulIntegerToFloat).
The placement therefore quantises

* the activation input of every quantised layer, and, walking up from it through operators that only
  move or select values (MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Identity), every
  tensor of that chain with the SAME scale and zero point (the values stay on one grid, so these Q/DQ
  pairs are exact, and onnxruntime runs the chain on uint8 tensors);
* the output of every quantised 8-bit Conv (after its ReLU when a ReLU is its only consumer: a uint8
  grid with zero point 0 clips negatives exactly as the ReLU does, and onnxruntime drops that ReLU),
  all its consumers reading the dequantised tensor; graph outputs stay float;
* the bias of every 8-bit Conv/Gemm as int32 codes with scale s_x * s_w (per output channel, zero point
  0), the form the integer kernels accumulate in (Jacob et al. 2018, eq. 9-10).

Ranges come from :mod:`fls_compress.quantize.act_ranges` (minmax, percentile or entropy), taken on the
model that already has the quantised weights (the activations the integer layers will actually see).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .act_ranges import activation_ranges, parse_calibration, uint8_params
from .qdq import unique_name

log = logging.getLogger(__name__)

#: single-data-input operators whose output values are a subset / rearrangement of their input's
VALUE_PRESERVING = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
_INT32 = np.iinfo(np.int32)


class TensorGraph:
    """Producer / consumer indices of a graph's tensors."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, n in enumerate(graph.node):
            for pos, name in enumerate(n.input):
                self.consumers.setdefault(name, []).append((i, pos))
        self.outputs = {o.name for o in graph.output}
        self.inits = {t.name: t for t in graph.initializer}

    def node_of(self, tensor: str) -> onnx.NodeProto | None:
        i = self.producer.get(tensor)
        return None if i is None else self.graph.node[i]


def value_chain(g: TensorGraph, tensor: str) -> list[str]:
    """``tensor`` and the tensors above it through value-preserving operators (not from initializers): the
    values along the chain are those of its last element, the root, so they share its activation range."""
    chain = [tensor]
    while (p := g.node_of(chain[-1])) is not None and p.op_type in VALUE_PRESERVING and p.input and p.input[0] not in g.inits:
        chain.append(p.input[0])
    return chain


def conv_output(g: TensorGraph, node: onnx.NodeProto) -> str:
    """The tensor a Conv's quantized output is taken at: its output, or its only consumer's if a Relu."""
    y = node.output[0]
    uses = g.consumers.get(y, [])
    if y not in g.outputs and len(uses) == 1 and g.graph.node[uses[0][0]].op_type == "Relu":
        y = g.graph.node[uses[0][0]].output[0]
    return y


def _weight_dq(g: TensorGraph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The DequantizeLinear producing the layer's weight input (input 1), if any."""
    dq = g.node_of(node.input[1]) if len(node.input) > 1 else None
    return dq if dq is not None and dq.op_type == "DequantizeLinear" else None


def _is_8bit(g: TensorGraph, dq: onnx.NodeProto | None) -> bool:
    codes = g.inits.get(dq.input[0]) if dq is not None else None
    return codes is not None and codes.data_type in (TensorProto.INT8, TensorProto.UINT8)


def _attr(node: onnx.NodeProto, key: str, default: object) -> object:
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def plan(model: onnx.ModelProto, consumers: list[tuple[onnx.NodeProto, int]]):
    """Which tensors get Q/DQ: ``{tensor: (params root, [(node index, input position) to rewire])}``,
    the layer node indices, and the names of layers whose output stays float (graph outputs)."""
    g = TensorGraph(model.graph)
    rewire: dict[str, set[tuple[int, int]]] = {}
    root: dict[str, str] = {}
    layers: list[int] = []
    missing: list[str] = []
    for node, pos in consumers:
        idx = next((i for i, n in enumerate(model.graph.node) if n == node), None)
        if idx is None:  # rewritten by an opset conversion
            missing.append(node.name or node.op_type)
            continue
        layers.append(idx)
        chain = value_chain(g, model.graph.node[idx].input[pos])
        rewire.setdefault(chain[0], set()).add((idx, pos))
        for below, t in zip(chain, chain[1:]):  # t is read (input 0) by the producer of the tensor below it
            rewire.setdefault(t, set()).add((g.producer[below], 0))
        for c in chain:
            root[c] = chain[-1]
    float_outputs: list[str] = []
    for idx in dict.fromkeys(layers):
        node = model.graph.node[idx]
        if node.op_type != "Conv" or not _is_8bit(g, _weight_dq(g, node)):
            continue
        y = conv_output(g, node)
        if y in g.outputs or not g.consumers.get(y):
            float_outputs.append(node.name or y)
            continue
        rewire.setdefault(y, set()).update(g.consumers[y])
        root.setdefault(y, y)
    return rewire, root, list(dict.fromkeys(layers)), missing, float_outputs


def quantize_biases(model: onnx.ModelProto, layers: list[int], act_scale: dict[str, float], taken: set[str]) -> int:
    """Int32 bias codes + DequantizeLinear (scale s_x * s_w) for the 8-bit Conv/Gemm layers of ``layers``
    whose input activation has the scale ``act_scale`` (the tensor the layer reads before rewiring);
    returns how many biases were quantised."""
    g = TensorGraph(model.graph)
    new_nodes, replaced = [], set()
    for idx in layers:
        node = model.graph.node[idx]
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in g.inits:
            continue
        dq = _weight_dq(g, node)
        if not _is_8bit(g, dq) or node.input[0] not in act_scale or any(a.name == "block_size" for a in dq.attribute):
            continue
        if node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0
                                       or _attr(node, "transA", 0)):
            continue
        bias = numpy_helper.to_array(g.inits[node.input[2]])
        w_scale = numpy_helper.to_array(g.inits[dq.input[1]]).astype(np.float64).reshape(-1)
        out_axis = 0 if node.op_type == "Conv" or _attr(node, "transB", 0) else 1
        per_channel = w_scale.size > 1
        if bias.dtype != np.float32 or bias.ndim != 1 or (per_channel and int(_attr(dq, "axis", 1)) != out_axis) \
                or (per_channel and w_scale.size != bias.size):
            continue
        scale = act_scale[node.input[0]] * w_scale
        if per_channel:
            scale = np.broadcast_to(scale, bias.shape)
        scale = np.where(scale > 0, scale, 1.0)
        raw = np.round(bias.astype(np.float64) / scale)
        if np.abs(raw).max(initial=0) > _INT32.max:
            log.warning("int8 activations: bias of %s exceeds int32 at scale s_x*s_w and is clipped", node.name or node.op_type)
        codes = np.clip(raw, _INT32.min, _INT32.max).astype(np.int32)
        base = node.input[2]
        c_name, s_name, z_name = (unique_name(taken, f"{base}_{s}") for s in ("int32", "int32_scale", "int32_zero_point"))
        out_name = unique_name(taken, f"{base}_int32_dequantized")
        scale_arr = np.asarray(scale, dtype=np.float32).reshape(-1) if per_channel else np.float32(scale.reshape(-1)[0])
        model.graph.initializer.extend([
            numpy_helper.from_array(codes, c_name),
            numpy_helper.from_array(np.asarray(scale_arr, dtype=np.float32), s_name),
            numpy_helper.from_array(np.zeros(np.shape(scale_arr), dtype=np.int32), z_name),
        ])
        attrs = {"axis": 0} if per_channel else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [c_name, s_name, z_name], [out_name],
                                          name=unique_name(taken, f"{base}_int32_DequantizeLinear"), **attrs))
        replaced.add(node.input[2])
        node.input[2] = out_name
    if new_nodes:
        nodes = new_nodes + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        drop = replaced - used  # float biases no node reads any more
        for field in (model.graph.initializer, model.graph.input):  # IR < 4 lists initializers as inputs
            kept = [t for t in field if t.name not in drop]
            del field[:]
            field.extend(kept)
    return len(new_nodes)


def add_activation_qdq(
    model: onnx.ModelProto,
    calib_inputs: dict[str, np.ndarray],
    consumers: list[tuple[onnx.NodeProto, int]],
    *,
    calibration: str = "minmax",
    num_samples: int = 512,
    chunk: int = 64,
    known_ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[onnx.ModelProto, dict[str, float | str]]:
    """A copy of ``model`` with the integer-kernel QDQ placement of the module doc for the listed
    consumers (node as it appears in ``model``, input position of its activation). ``known_ranges``:
    minmax ranges already measured on this model's activations (e.g. during GPTQ's capture); only the
    other tensors are calibrated here (minmax calibration only)."""
    kind, _ = parse_calibration(calibration)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    rewire, root, layers, missing, float_outputs = plan(out, consumers)
    if missing:
        log.warning("activation QDQ: %d layer(s) were rewritten by the opset conversion and keep float inputs: %s",
                    len(missing), ", ".join(missing))
    feeds = {k: np.asarray(v)[:num_samples] for k, v in calib_inputs.items()}
    roots = list(dict.fromkeys(root[t] for t in rewire))
    ranges = {r: known_ranges[r] for r in roots if kind == "minmax" and known_ranges and r in known_ranges}
    missing_roots = [r for r in roots if r not in ranges]
    if missing_roots:
        ranges.update(activation_ranges(model, feeds, missing_roots, calibration, chunk=chunk))
    params = {t: uint8_params(*ranges[root[t]]) for t in rewire}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    taken |= {n.name for n in graph.node}
    layer_inputs = {graph.node[i].input[0]: float(params[graph.node[i].input[0]][0])
                    for i in layers if graph.node[i].input[0] in params}
    biases = quantize_biases(out, layers, layer_inputs, taken)
    offset = len(graph.node) - len(model.graph.node)  # bias DQ nodes were put first
    pairs: dict[str, list[onnx.NodeProto]] = {}
    for value, uses in rewire.items():
        scale, zero = params[value]
        s_name, z_name, q_name, dq_name = (unique_name(taken, f"{value}_act_{s}")
                                           for s in ("scale", "zero_point", "quantized", "dequantized"))
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        graph.initializer.append(numpy_helper.from_array(np.array(zero, dtype=np.uint8), z_name))
        pairs[value] = [helper.make_node("QuantizeLinear", [value, s_name, z_name], [q_name], name=q_name + "_Q"),
                        helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name], name=dq_name + "_DQ")]
        for idx, pos in uses:
            graph.node[idx + offset].input[pos] = dq_name
    # place each pair right after the producer of its tensor (graph inputs: at the start)
    producers = {o for n in graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = [n for value, pair in pairs.items() if value not in producers for n in pair]
    for n in graph.node:
        nodes.append(n)
        for o in n.output:
            nodes.extend(pairs.get(o, ()))
    del graph.node[:]
    graph.node.extend(nodes)
    if float_outputs:
        log.info("int8 activations: %d Conv output(s) are graph outputs and stay float (no QLinearConv): %s",
                 len(float_outputs), ", ".join(float_outputs))
    samples = int(next(iter(feeds.values())).shape[0]) if feeds else 0
    info: dict[str, float | str] = {
        "activation_qdq_tensors": float(len(pairs)),
        "activation_qdq_skipped": ", ".join(missing),
        "activation_calibration": f"{calibration} over {samples} samples, uint8 per tensor",
        "activation_ranges_calibrated": float(len(roots)),
        "activation_ranges_from_capture": float(len(roots) - len(missing_roots)),
        "int32_biases": float(biases),
        "float_output_convs": ", ".join(float_outputs),
    }
    return out, info
