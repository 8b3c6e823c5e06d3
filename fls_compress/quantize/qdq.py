"""Weight-only QDQ export: integer initializers followed by ``DequantizeLinear`` (ONNX operator spec).

Each quantised weight ``W`` becomes

    W_quantized (int8 / uint8 / int4 / uint4 initializer) -> DequantizeLinear(scale[, zero_point]) -> W

whose output keeps the weight's name, so every original consumer (Conv, Gemm, MatMul, an Identity)
reads it unchanged and the rest of the graph is untouched. Grid layout in the ONNX array:

* per-tensor: scalar scale / zero point (opset >= 10);
* per-channel: 1-D scale along the OUTPUT axis of the ONNX array (``axis``: Conv [O, C, kh, kw] -> 0,
  Gemm B -> 0 with transB=1 else 1, MatMul ``X @ W`` ([in, out]) -> 1, ``W @ X`` -> 0) (opset >= 13);
* block:g: ``block_size`` = g along the INPUT axis (opset >= 21). A Conv's input axis is the flattened
  C*kh*kw, so its codes are stored as the (O, C*kh*kw) matrix and a ``Reshape`` restores [O, C, kh, kw];
* int4 / uint4 codes need opset >= 21. With ``prefer_nbits`` (``--matmul-format auto``, the default) 4-bit
  MatMul weights read as ``X @ W`` and Gemm weights (alpha = beta = 1) are written as
  ``com.microsoft.MatMulNBits`` (:mod:`fls_compress.quantize.nbits`, onnxruntime's 4-bit kernel; counted in
  ``matmul_nbits``); so are they, as a fallback, when the opset cannot be raised; any other weight is refused.

The default-domain opset is raised only when the grid needs it: by renumbering when no operator of
the graph changes its definition between the two versions, else with ``onnx.version_converter``; the
result says whether (and from what) it was raised. Models that already contain quantisation
operators are refused (:class:`~fls_compress.errors.UnsupportedModelError`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError
from ..io.activations import LayerUse, from_matrix
from ..io.onnx_model import PrunableSite
from .grid import Grid
from .nbits import DOMAIN, nbits_supported, write_matmul_nbits

log = logging.getLogger(__name__)

#: operators that mean a model is already quantised
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "DynamicQuantizeMatMul",
})


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Raise :class:`UnsupportedModelError` if the graph already holds quantisation operators."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    if found:
        raise UnsupportedModelError(f"the model is already quantized (contains {', '.join(found)}); "
                                    "quantize the float model instead")


@dataclass
class QuantizedWeight:
    """Integer codes of one weight in its (out, in) matrix view, with the grid that dequantizes them."""

    codes: np.ndarray  # int32 (out, in)
    grid: Grid


def _code_type(grid: Grid) -> tuple[int, type]:
    if grid.spec.bits == 8:
        return (TensorProto.INT8, np.int8) if grid.spec.symmetric else (TensorProto.UINT8, np.uint8)
    return (TensorProto.INT4, np.int8) if grid.spec.symmetric else (TensorProto.UINT4, np.uint8)


def required_opset(grids: list[Grid]) -> int:
    """Lowest default-domain opset whose DequantizeLinear can express every grid."""
    need = 10
    for g in grids:
        if g.spec.bits == 4 or g.spec.block is not None:
            need = max(need, 21)
        elif g.spec.granularity == "channel":
            need = max(need, 13)
    return need


def _axes(site: PrunableSite, use: LayerUse) -> tuple[int, int]:
    """(output axis, input axis) of the weight's ONNX array."""
    if site.op_type == "Conv":
        return 0, 1
    if site.op_type == "Gemm":
        return (0, 1) if int(use.attr("transB", 0)) else (1, 0)  # type: ignore[arg-type]
    return (1, 0) if use.weight_position == 1 else (0, 1)


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` at default-domain opset ``target`` (>= the current one); see the module doc."""
    current = default_opset(model)
    if current >= target:
        return model
    changed = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, current).since_version
            new = onnx.defs.get_schema(node.op_type, target).since_version
        except onnx.defs.SchemaError:
            changed.add(node.op_type)
            continue
        if old != new:
            changed.add(node.op_type)
    if not changed:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for op in out.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = target
    else:
        try:
            out = onnx.version_converter.convert_version(model, target)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError / ConvertError
            raise UnsupportedModelError(
                f"the quantized weights need opset {target}, but converting this opset-{current} model failed "
                f"(operators {', '.join(sorted(changed))} changed): {str(exc).splitlines()[0] if str(exc) else exc}"
            ) from exc
    min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    out.ir_version = max(int(out.ir_version), int(min_ir))
    return out


def unique_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (which then holds it)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def code_tensor(name: str, onnx_type: int, np_type: type, values: np.ndarray) -> onnx.TensorProto:
    """Integer codes as raw bytes: one byte each for 8-bit types; two per byte for 4-bit types, the
    first element in the low nibble (ONNX INT4/UINT4 layout). Without ``raw_data`` onnx would store
    them as varint ``int32_data``, which makes a quantized file larger than the float one."""
    flat = np.ascontiguousarray(values).astype(np_type).reshape(-1)
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        nib = (flat.astype(np.int16) & 0x0F).astype(np.uint8)
        if nib.size % 2:
            nib = np.concatenate([nib, np.zeros(1, np.uint8)])
        raw = (nib[0::2] | (nib[1::2] << 4)).tobytes()
    else:
        raw = flat.tobytes()
    return helper.make_tensor(name, onnx_type, list(np.shape(values)), raw, raw=True)


def write_qdq(
    model: onnx.ModelProto,
    weights: dict[str, QuantizedWeight],
    sites: dict[str, PrunableSite],
    uses: dict[str, list[LayerUse]],
    *,
    allow_opset_raise: bool = True,
    prefer_nbits: bool = False,
) -> tuple[onnx.ModelProto, dict[str, int | bool | str]]:
    """A copy of ``model`` with each named float weight replaced by codes + ``DequantizeLinear``
    (``prefer_nbits``: 4-bit MatMul weights that MatMulNBits can express become MatMulNBits instead).

    Returns the model and ``{"opset": final, "opset_before": original, "opset_raised": bool,
    "matmul_nbits": count, "matmul_nbits_weights": names, "nbits_fallback": bool}``.
    """
    refuse_quantized(model)
    before = default_opset(model)
    nbits: list[str] = []
    if prefer_nbits:
        inits = {t.name: t for t in model.graph.initializer}
        nbits = [n for n, q in weights.items() if q.grid.spec.bits == 4 and model_float(model, n)
                 and nbits_supported(sites[n], uses[n], q.grid, n, inits) is None]
    need = required_opset([q.grid for n, q in weights.items() if n not in nbits])
    fallback = False
    out = None
    if need > before:
        problem = None
        if allow_opset_raise:
            try:
                out = raise_opset(model, need)
            except UnsupportedModelError as exc:
                problem = exc
        else:
            problem = UnsupportedModelError(
                f"these weights need DequantizeLinear from opset {need} (int4 codes or block_size need 21, "
                f"per-channel axis 13); the model has opset {before} and raising it is not allowed")
        if problem is not None:  # 4-bit MatMul weights can still use com.microsoft.MatMulNBits
            for n, q in weights.items():
                if required_opset([q.grid]) > before:
                    why = nbits_supported(sites[n], uses[n], q.grid, n, {t.name: t for t in model.graph.initializer})
                    if why is not None or q.grid.spec.bits != 4:
                        raise UnsupportedModelError(f"{problem} ({n!r} cannot use MatMulNBits either: "
                                                    f"{why or 'only 4-bit weights'}); use bits=8 with per-tensor or "
                                                    "per-channel granularity") from problem
                    if n not in nbits:
                        nbits.append(n)
            fallback = True
            log.warning("opset %d kept: %d 4-bit MatMul weight(s) written as com.microsoft.MatMulNBits "
                        "(onnxruntime only)", before, len(nbits))
    if out is None:
        out = _copy(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
    index = {t.name: i for i, t in enumerate(graph.initializer)}
    new_nodes: list[onnx.NodeProto] = []
    drop: set[str] = set()
    for name, q in weights.items():
        site, use = sites[name], uses[name][0]
        tensor = graph.initializer[index[name]]
        if name in nbits:
            if tensor.data_type != TensorProto.FLOAT:
                raise UnsupportedModelError(f"weight {name!r}: only float32 weights can be written as MatMulNBits")
            write_matmul_nbits(graph, name, q.codes, q.grid, uses[name], lambda base: unique_name(taken, base))
            drop.add(name)
            continue
        if tensor.data_type != TensorProto.FLOAT:
            raise UnsupportedModelError(f"weight {name!r}: only float32 weights can be written as QDQ")
        out_axis, in_axis = _axes(site, use)
        onnx_type, np_type = _code_type(q.grid)
        spec = q.grid.spec
        conv_block = site.op_type == "Conv" and spec.block is not None
        codes = q.codes if conv_block else from_matrix(site, use, q.codes)
        if spec.granularity == "tensor":
            scale, zero, attrs = q.grid.scale[0, 0].reshape(()), q.grid.zero_point[0, 0].reshape(()), {}
        elif spec.block is None:
            scale, zero, attrs = q.grid.scale[:, 0], q.grid.zero_point[:, 0], {"axis": out_axis}
        else:
            scale, zero = q.grid.scale, q.grid.zero_point  # (out, in/g) = layout of (out, in) arrays
            axis = 1 if conv_block else in_axis
            if axis == 0:
                scale, zero = scale.T, zero.T
            attrs = {"axis": axis, "block_size": int(spec.block)}
        codes_name = unique_name(taken, f"{name}_quantized")
        scale_name = unique_name(taken, f"{name}_scale")
        graph.initializer.append(code_tensor(codes_name, onnx_type, np_type, codes))
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale, dtype=np.float32), scale_name))
        inputs = [codes_name, scale_name]
        # an explicit zero point also for symmetric int8 (all zeros): onnxruntime's Gemm QDQ selector fuses
        # DequantizeLinear -> Gemm into QGemm only when the weight's DequantizeLinear has one
        if not spec.symmetric or spec.bits == 8:
            zp_name = unique_name(taken, f"{name}_zero_point")
            graph.initializer.append(code_tensor(zp_name, onnx_type, np_type, zero))
            inputs.append(zp_name)
        dq_out = unique_name(taken, f"{name}_dequantized_2d") if conv_block else name
        new_nodes.append(helper.make_node("DequantizeLinear", inputs, [dq_out],
                                          name=unique_name(taken, f"{name}_DequantizeLinear"), **attrs))
        if conv_block:
            shape_name = unique_name(taken, f"{name}_shape")
            graph.initializer.append(numpy_helper.from_array(np.array(site.shape, dtype=np.int64), shape_name))
            new_nodes.append(helper.make_node("Reshape", [dq_out, shape_name], [name], name=unique_name(taken, f"{name}_Reshape")))
        drop.add(name)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs_kept = [v for v in graph.input if v.name not in drop]  # IR < 4 lists initializers as inputs
    del graph.input[:]
    graph.input.extend(inputs_kept)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    if nbits and not any(op.domain == DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    after = default_opset(out)
    if after != before:
        log.info("default-domain opset raised from %d to %d for DequantizeLinear", before, after)
    return out, {"opset": after, "opset_before": before, "opset_raised": after != before, "matmul_nbits": len(nbits),
                 "matmul_nbits_weights": ", ".join(nbits), "nbits_fallback": fallback}


def model_float(model: onnx.ModelProto, name: str) -> bool:
    """Whether initializer ``name`` is float32 (MatMulNBits takes float32 weights only)."""
    return any(t.name == name and t.data_type == TensorProto.FLOAT for t in model.graph.initializer)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
