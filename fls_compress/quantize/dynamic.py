"""Dynamic int8 activations (``activations="int8-dynamic"``): 8-bit MatMul/Gemm weights whose inputs are
quantized per call, the pattern onnxruntime fuses into ``DynamicQuantizeMatMul``.

Each 8-bit MatMul ``X @ W`` / Gemm ``A B [+ C]`` layer (alpha = beta = 1, A not transposed) whose weight
``codes -> DequantizeLinear -> W`` :func:`~fls_compress.quantize.qdq.write_qdq` wrote becomes

    DynamicQuantizeLinear(X) -> (X_q, s_x, z_x)                       (once per input tensor)
    MatMulInteger(X_q, W_q [K, N], z_x, z_w) -> int32
    Cast(float) -> Mul(s_x * s_w) [-> Add(C)] -> Y

DynamicQuantizeLinear quantizes X to uint8 with the range [min(X, 0), max(X, 0)] of the tensor it is
called on (ONNX operator specification), so the activation grid follows each batch instead of a
calibrated static range (Jacob et al. 2018, eq. 1 with per-call min/max); the weights keep their
OBS/GPTQ-compensated per-channel int8 codes and scales s_w (per output column N, or one per tensor).
The int32 products of the codes are exact, and s_x * s_w rescales them to float: Y = s_x s_w
(X_q - z_x)(W_q - z_w). onnxruntime's graph optimiser replaces the group by one ``DynamicQuantizeMatMul``
(or ``MatMulIntegerToFloat``) kernel; the kernel census of the report shows whether it did.

Layers of any other form (MatMul ``W @ X``, Gemm with alpha/beta != 1 or transA, block-wise 8-bit grids)
keep their DequantizeLinear weight and float product; they are listed in ``dynamic_skipped``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .qdq import unique_name

log = logging.getLogger(__name__)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node: onnx.NodeProto, weight: str) -> bool:
    """X @ W MatMul or A B (+ C) Gemm reading ``weight`` as its second input."""
    if len(node.input) < 2 or node.input[1] != weight or node.input[0] == weight:
        return False
    if node.op_type == "MatMul":
        return True
    if node.op_type != "Gemm":
        return False
    a = _attrs(node)
    return not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0 and (len(node.input) < 3 or a.get("beta", 1.0) == 1.0)


def add_dynamic_activations(model: onnx.ModelProto, weights: list[str]) -> tuple[onnx.ModelProto, dict[str, float | str], list[str]]:
    """A copy of the QDQ ``model`` with the listed 8-bit weights' MatMul/Gemm layers rewritten as above;
    returns it, ``{"dynamic_int8_layers": count, "dynamic_skipped": names}`` and the skipped weights."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {v.name for v in graph.input} | {n.name for n in graph.node}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(layer node) -> its replacement nodes
    dql: dict[str, onnx.NodeProto] = {}  # input tensor -> its DynamicQuantizeLinear
    dropped_codes: set[str] = set()
    drop_nodes: set[int] = set()
    skipped: list[str] = []
    rewritten = 0
    for name in weights:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            skipped.append(name)
            continue
        codes_t = inits[dq.input[0]]
        da = _attrs(dq)
        if codes_t.data_type not in (TensorProto.INT8, TensorProto.UINT8) or "block_size" in da or len(dq.input) < 3:
            skipped.append(name)
            continue
        layers = consumers.get(name, [])
        if not layers or not all(_eligible(n, name) for n in layers) or name in {o.name for o in graph.output}:
            skipped.append(name)
            continue
        codes = numpy_helper.to_array(codes_t)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        for node in layers:
            trans_b = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
            axis = int(da.get("axis", 1))
            if scale.ndim == 1 and axis != (0 if trans_b else 1):  # the scale must run along N
                skipped.append(name)
                break
        else:
            for node in layers:
                trans_b = node.op_type == "Gemm" and _attrs(node).get("transB", 0)
                w_name = unique_name(taken, f"{name}_kn" if trans_b else f"{name}_codes")
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes.T if trans_b else codes), w_name))
                x = node.input[0]
                if x not in quantized_inputs:
                    names = tuple(unique_name(taken, f"{x}_dyn_{s}") for s in ("quantized", "scale", "zero_point"))
                    quantized_inputs[x] = names  # type: ignore[assignment]
                    dql[x] = helper.make_node("DynamicQuantizeLinear", [x], list(names),
                                              name=unique_name(taken, f"{x}_DynamicQuantizeLinear"))
                xq, xs, xz = quantized_inputs[x]
                base = node.name or node.output[0]
                sc, prod, cast, y = (unique_name(taken, f"{base}_{s}") for s in ("scales", "int32", "float", "scaled"))
                has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
                nodes = [
                    helper.make_node("Mul", [xs, dq.input[1]], [sc], name=unique_name(taken, f"{base}_scales_Mul")),
                    helper.make_node("MatMulInteger", [xq, w_name, xz, dq.input[2]], [prod],
                                     name=unique_name(taken, f"{base}_MatMulInteger")),
                    helper.make_node("Cast", [prod], [cast], to=TensorProto.FLOAT, name=unique_name(taken, f"{base}_Cast")),
                    helper.make_node("Mul", [cast, sc], [y if has_bias else node.output[0]],
                                     name=unique_name(taken, f"{base}_Mul")),
                ]
                if has_bias:
                    nodes.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]], name=unique_name(taken, f"{base}_bias_Add")))
                replace[id(node)] = nodes
                rewritten += 1
            drop_nodes.add(id(dq))
            dropped_codes.add(dq.input[0])
    # each DynamicQuantizeLinear right after the producer of its input (graph inputs, initializers: first)
    new_nodes: list[onnx.NodeProto] = [q for x, q in dql.items() if x not in producer]
    for n in graph.node:
        if id(n) in drop_nodes:
            continue
        new_nodes.extend(replace.get(id(n), [n]))
        new_nodes.extend(dql[o] for o in n.output if o in dql)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    for field in (graph.initializer, graph.input):  # the [N, K] codes replaced by their [K, N] copies
        kept = [t for t in field if t.name not in dropped_codes or t.name in used]
        del field[:]
        field.extend(kept)
    if skipped:
        log.warning("int8-dynamic: %d weight(s) keep a DequantizeLinear weight and a float product (not an X @ W MatMul "
                    "or a plain Gemm with a per-channel/per-tensor 8-bit grid): %s", len(skipped), ", ".join(skipped))
    return out, {"dynamic_int8_layers": float(rewritten), "dynamic_skipped": ", ".join(skipped)}, skipped
