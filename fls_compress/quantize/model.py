"""Quantise the Conv/Gemm/MatMul weights of an ONNX model (optionally jointly with pruning) and export QDQ.

:func:`quantize_weights` computes the integer codes of every weight with ``rtn``, ``gptq`` (layer
Hessians from onnxruntime-captured inputs, wave by wave as in :mod:`fls_compress.pruning.layerwise`)
or ``fls`` (a caller-supplied inverse-curvature factor per layer); :func:`quantize_model` also writes
the QDQ model (:mod:`fls_compress.quantize.qdq`) and, with ``activations="int8"``, adds static
activation QDQ (:mod:`fls_compress.quantize.activations`); with ``activations="int8-dynamic"`` MatMul/Gemm
inputs are quantized per call (:mod:`fls_compress.quantize.dynamic`) and Conv inputs statically.

Sparsity with quantisation: ``sparsity`` s prunes ceil(s * total) weights, split uniformly over the
layers (largest remainder, as SparseGPT); ``pattern`` "N:M" prunes N of every M along the reduction
axis (Conv: input channels at a kernel position). ``gptq``/``fls`` choose the pruned weights inside
the sweep (SparseGPT's adaptive selection), ``rtn`` by magnitude.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import InvalidDataError, InvalidOptionError
from ..io.activations import LayerUse, conv_groups, from_matrix, layer_sites, prepare_feeds, to_matrix
from ..io.layer_rows import DEFAULT_MAX_ROWS, RowStatistics, conv_supported
from ..io.onnx_model import PrunableSite, densify_sparse_initializers, read_initializer_arrays
from ..pruning.layerwise import rows_info_fields, sweep_layers
from ..pruning.selection import allocate_counts, nm_groupable, nm_layout, parse_pattern
from ..stage_clock import StageClock
from .gptq import fls_quantize_matrix, gptq_quantize_matrix, rtn_quantize_matrix
from .grid import Grid, QuantSpec
from .qdq import QuantizedWeight, refuse_quantized, write_qdq
from .shrinkage import SHRINKAGE, layer_hessian

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "fls")
ACTIVATIONS = ("none", "int8", "int8-dynamic")
MATMUL_FORMATS = ("auto", "qdq")


def _magnitude_keep(mat: np.ndarray, count: int, nm: tuple[int, int] | None, order: torch.Tensor | None) -> np.ndarray:
    """RTN's pruning: the ``count`` smallest |w| of the layer, or N smallest of each N:M group."""
    a = np.abs(mat)
    keep = np.ones(mat.shape, dtype=bool)
    if nm is not None:
        perm = None if order is None else order.numpy()
        b = a if perm is None else a[:, perm]
        idx = np.argsort(b.reshape(b.shape[0], -1, nm[1]), axis=-1, kind="stable")[..., : nm[0]]
        kp = np.ones(b.shape, dtype=bool).reshape(b.shape[0], -1, nm[1])
        np.put_along_axis(kp, idx, False, axis=-1)
        kp = kp.reshape(b.shape)
        if perm is not None:
            keep[:, perm] = kp
        else:
            keep = kp
    elif count > 0:
        keep.reshape(-1)[np.argsort(a.reshape(-1), kind="stable")[:count]] = False
    return keep


def quantize_weights(
    model: onnx.ModelProto,
    calib_inputs: Mapping[str, np.ndarray] | None,
    *,
    method: str = "gptq",
    bits: int = 8,
    granularity: str = "channel",
    symmetric: bool = True,
    sparsity: float | None = None,
    pattern: str | None = None,
    act_order: bool = False,
    names: list[str] | None = None,
    seed: int = 0,
    curvature: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    percdamp: float = 0.01,
    block_size: int = 128,
    num_samples: int = 512,
    max_rows_per_layer: int | None = DEFAULT_MAX_ROWS,
    sequential: bool = True,
    chunk: int = 64,
    range_tensors: Sequence[str] = (),
    ranges: dict[str, tuple[float, float]] | None = None,
    clock: StageClock | None = None,
    shrinkage: str = "oas",
) -> tuple[dict[str, QuantizedWeight], dict[str, float | str]]:
    """Integer codes (matrix view) of every float32 Conv/Gemm/MatMul weight (or ``names``) and an info dict.

    ``ranges``: filled with (min, max) over the calibration samples of each of ``range_tensors`` that
    the chained ``gptq`` capture computed on the model with the final weights (no extra pass), see
    :func:`~fls_compress.pruning.layerwise.sweep_layers`. ``clock`` receives the stage times."""
    clock = clock or StageClock()
    if method not in METHODS:
        raise InvalidOptionError(f"quantization method must be one of {', '.join(METHODS)}, got {method!r}")
    spec = QuantSpec(int(bits), bool(symmetric), str(granularity))
    nm = parse_pattern(pattern)
    if nm is not None and sparsity:
        raise InvalidOptionError("give either sparsity or pattern, not both")
    if sparsity is not None and not 0.0 <= float(sparsity) < 1.0:
        raise InvalidOptionError(f"sparsity must be in [0, 1), got {sparsity}")
    if act_order and method != "gptq":
        raise InvalidOptionError("act_order is a GPTQ option (columns ordered by the layer Hessian)")
    if shrinkage not in SHRINKAGE:
        raise InvalidOptionError(f"hessian shrinkage must be one of {', '.join(SHRINKAGE)}, got {shrinkage!r}")
    if not percdamp >= 0 or block_size < 1:
        raise InvalidOptionError("percdamp must be >= 0 and block_size >= 1")
    refuse_quantized(model)
    work = densify_sparse_initializers(model)
    sites, uses = layer_sites(work, names)
    arrays = read_initializer_arrays(work)
    info: dict[str, float | str] = {"method": method, "bits": float(spec.bits), "granularity": spec.granularity,
                                    "symmetric": "yes" if spec.symmetric else "no", "act_order": "yes" if act_order else "no"}
    skipped = [n for n, s in sites.items() if arrays[n].dtype != np.float32 or not uses[n]
               or (method == "gptq" and not conv_supported(s))]
    for n in skipped:
        log.warning("quantize: %r (%s, dtype %s) is not supported by %s and stays float", n, sites[n].op_type,
                    arrays[n].dtype, method)
    info["skipped_layers"] = ", ".join(skipped)
    active = [n for n in sites if n not in skipped]
    mats = {n: to_matrix(sites[n], uses[n][0], arrays[n]).astype(np.float64) for n in active}
    grids = {}
    for n in active:  # block:g with g not dividing the columns: the last block of a row is shorter
        grids[n] = Grid.fit(mats[n], spec)
    layout = {n: nm_layout(sites[n].op_type, sites[n].shape, mats[n].shape[1]) for n in active}
    counts = {n: 0 for n in active}
    dense: list[str] = []
    if nm is not None:
        dense = [n for n in active if not nm_groupable(layout[n][0], nm[1])]
        for n in dense:
            log.warning("quantize: %r has %d input channels, not a multiple of %d; N:M leaves it dense", n,
                        layout[n][0], nm[1])
    elif sparsity:
        sizes = [mats[n].size for n in active]
        counts = dict(zip(active, allocate_counts(math.ceil(float(sparsity) * sum(sizes) - 1e-9), sizes)))
    info["nm_dense_layers"] = ", ".join(dense)
    layer_nm = {n: (None if n in dense else nm) for n in active}
    values: dict[str, np.ndarray] = {}
    losses: dict[str, float] = {}
    rhos: dict[str, float] = {}

    def quantize_groups(n: str, site: PrunableSite, use: LayerUse, mat: np.ndarray, stats: RowStatistics | None) -> np.ndarray:
        g = conv_groups(site, use)
        rows_per = mat.shape[0] // g
        grid = grids[n]
        group_counts = allocate_counts(counts[n], [rows_per * mat.shape[1]] * g)
        out = np.empty(mat.shape, dtype=np.float32)
        loss = 0.0
        for gi in range(g):
            r = slice(gi * rows_per, (gi + 1) * rows_per)
            sub = Grid(spec, grid.scale[r], grid.zero_point[r], grid.group_size)
            w = torch.from_numpy(mat[r])
            order = layout[n][1] if layer_nm[n] is not None else None
            if method == "gptq":
                assert stats is not None
                h, rhos[n] = layer_hessian(stats, gi, shrinkage)
                res = gptq_quantize_matrix(w, h, sub, percdamp=percdamp, use_act_order=act_order,
                                           col_order=order, prune_count=group_counts[gi], nm=layer_nm[n],
                                           block_size=block_size)
            else:
                u, row_scale = curvature[n]  # type: ignore[index]
                rs = None if row_scale is None else torch.as_tensor(row_scale, dtype=torch.float64)[r]
                res = fls_quantize_matrix(w, torch.as_tensor(u, dtype=torch.float64), rs, sub, col_order=order,
                                          prune_count=group_counts[gi], nm=layer_nm[n], block_size=block_size)
            out[r] = res.weight.numpy().astype(np.float32)
            loss += float(res.loss.sum())
        losses[n] = loss
        return out

    if method == "rtn":
        for n in active:
            keep = _magnitude_keep(mats[n], counts[n], layer_nm[n], layout[n][1]) if (counts[n] or layer_nm[n]) else None
            values[n] = rtn_quantize_matrix(mats[n], grids[n], keep)
    elif method == "fls":
        missing = [n for n in active if curvature is None or n not in curvature]
        if missing:
            raise InvalidOptionError(f"fls quantization needs curvature (U, row_scale) for: {', '.join(missing)}")
        for n in active:
            u = curvature[n][0]  # type: ignore[index]
            in_per = mats[n].shape[1]
            if tuple(u.shape) != (in_per, in_per):
                raise InvalidOptionError(f"curvature U of {n!r} must be ({in_per}, {in_per}), got {tuple(u.shape)}")
            row_scale = curvature[n][1]  # type: ignore[index]
            if row_scale is not None and tuple(row_scale.shape) != mats[n].shape:
                raise InvalidOptionError(f"curvature row_scale of {n!r} must be {mats[n].shape}, got {tuple(row_scale.shape)}")
            values[n] = quantize_groups(n, sites[n], uses[n][0], mats[n], None)
    else:
        if not calib_inputs:
            raise InvalidDataError("gptq needs calibration inputs (layer Hessians come from captured activations)")
        feeds = {k: np.asarray(v)[:num_samples] for k, v in calib_inputs.items()}

        def transform(n: str, site: PrunableSite, us: list[LayerUse], stats: RowStatistics, arr: np.ndarray) -> np.ndarray:
            values[n] = quantize_groups(n, site, us[0], mats[n], stats)
            return from_matrix(site, us[0], values[n]).astype(arr.dtype)

        def observe(t: str, a: np.ndarray) -> None:
            if ranges is not None and a.size:
                lo, hi = ranges.get(t, (np.inf, -np.inf))
                amin, amax = torch.aminmax(torch.from_numpy(np.ascontiguousarray(a)))  # one pass, threaded
                ranges[t] = (min(lo, float(amin)), max(hi, float(amax)))

        _, rows = sweep_layers(work, feeds, active, transform, full=True, sequential=sequential, chunk=chunk,
                               max_rows=max_rows_per_layer, seed=seed, label="gptq", observe=observe,
                               observed=list(range_tensors) if ranges is not None else [], clock=clock)
        info.update(rows_info_fields(rows))
        info["num_samples"] = float(len(next(iter(prepare_feeds(work, feeds).values()))))
        info["sequential"] = "yes" if sequential else "no"
        info["hessian_shrinkage"] = shrinkage
        info["max_rows_per_layer"] = float(max_rows_per_layer or 0)
        if shrinkage != "none" and rhos:
            info["hessian_shrinkage_max"] = float(max(rhos.values()))
            info["hessian_shrinkage_mean"] = float(sum(rhos.values()) / len(rhos))

    result: dict[str, QuantizedWeight] = {}
    for n in active:
        codes = grids[n].codes(values[n])
        if not np.array_equal(grids[n].dequantize(codes), values[n]):  # every value must be a grid point
            raise RuntimeError(f"quantize: weights of {n!r} left the grid")
        result[n] = QuantizedWeight(codes, grids[n])
    total = sum(mats[n].size for n in active)
    info["layers_quantized"] = float(len(active))
    info["weights_quantized"] = float(total)
    info["sparsity"] = float(sum(int((values[n] == 0).sum()) for n in active) / max(total, 1))
    if losses:
        info["obs_loss"] = float(sum(losses.values()))
    return result, info


def quantize_model(
    model: onnx.ModelProto,
    calib_inputs: Mapping[str, np.ndarray] | None,
    *,
    activations: str = "none",
    act_calibration: str = "minmax",
    matmul_format: str = "auto",
    allow_opset_raise: bool = True,
    **options: object,
) -> tuple[onnx.ModelProto, dict[str, float | str]]:
    """Quantised QDQ model and report info. ``options`` go to :func:`quantize_weights` (method, bits,
    granularity, symmetric, sparsity, pattern, act_order, names, seed, curvature, percdamp, ...).
    ``act_calibration`` chooses the activation ranges (:mod:`~fls_compress.quantize.act_ranges`);
    ``matmul_format`` ``auto`` writes 4-bit MatMul weights as ``com.microsoft.MatMulNBits`` (the kernel
    onnxruntime runs 4-bit weights with), ``qdq`` as DequantizeLinear (portable ONNX)."""
    if activations not in ACTIVATIONS:
        raise InvalidOptionError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if matmul_format not in MATMUL_FORMATS:
        raise InvalidOptionError(f"matmul_format must be one of {', '.join(MATMUL_FORMATS)}, got {matmul_format!r}")
    clock = StageClock()
    # minmax ranges of 8-bit layers' activations come out of gptq's capture when it is chained (the tensors
    # it computes there already carry the final weights of every layer they depend on)
    reuse = activations in ("int8", "int8-dynamic") and act_calibration == "minmax" and int(options.get("bits", 8)) == 8  # type: ignore[call-overload]
    captured: dict[str, tuple[float, float]] | None = {} if reuse else None
    candidates = range_candidates(model, options.get("names")) if reuse else []  # type: ignore[arg-type]
    weights, info = quantize_weights(model, calib_inputs, range_tensors=candidates, ranges=captured, clock=clock,
                                     **options)  # type: ignore[arg-type]
    with clock("write_qdq"):
        work = densify_sparse_initializers(model)
        sites, uses = layer_sites(work, list(weights))
        out, opset = write_qdq(work, weights, sites, uses, allow_opset_raise=allow_opset_raise,
                               prefer_nbits=matmul_format == "auto")
    info.update({k: (v if isinstance(v, str) else float(v) if not isinstance(v, bool) else ("yes" if v else "no"))
                 for k, v in opset.items()})
    nbits = set(str(opset.get("matmul_nbits_weights", "")).split(", ")) - {""}
    info["matmul_nbits_weights"] = ", ".join(sorted(nbits))
    if opset.get("nbits_fallback"):
        info["fallback"] = "opset kept: 4-bit MatMul weights as com.microsoft.MatMulNBits (onnxruntime only)"
    info["activations"] = activations
    if activations in ("int8", "int8-dynamic"):
        from .activations import add_activation_qdq

        if nbits:  # MatMulNBits quantizes its input itself: int8 per block at run time (accuracy_level 4)
            for node in out.graph.node:
                if node.op_type == "MatMulNBits":
                    node.attribute.append(helper.make_attribute("accuracy_level", 4))
            log.info("activations=%s: the %d MatMulNBits layer(s) quantize their inputs to int8 per block at run time "
                     "(onnxruntime accuracy_level 4), not with static ranges", activations, len(nbits))
        static = [n for n in weights if n not in nbits and weights[n].grid.spec.bits == 8]
        unfused = [n for n in weights if n not in nbits and n not in static]
        info["float_activation_layers"] = ", ".join(unfused)
        if unfused:  # no onnxruntime integer kernel takes 4-bit Conv / DequantizeLinear weights
            log.warning("activations=%s: %d 4-bit layer(s) that are not MatMulNBits keep float inputs (a quantized "
                        "input would not run in an integer kernel, only add error and time): %s", activations,
                        len(unfused), ", ".join(unfused))
        if activations == "int8-dynamic":
            from .dynamic import add_dynamic_activations

            candidates = [n for n in static if sites[n].op_type in ("MatMul", "Gemm")]
            out, dyn_info, not_dynamic = add_dynamic_activations(out, candidates)
            info.update(dyn_info)
            static = [n for n in static if n not in candidates or n in not_dynamic]
            info["static_activation_layers"] = ", ".join(static)
            if static:
                log.info("activations=int8-dynamic: %d layer(s) (Conv, or a form DynamicQuantizeMatMul cannot take) "
                         "get static int8 activation ranges: %s", len(static), ", ".join(static))
        if static:
            if not calib_inputs:
                raise InvalidDataError(f"activations={activations} needs calibration inputs for the static activation "
                                       "ranges" + (" of its Conv layers" if activations == "int8-dynamic" else ""))
            consumers = [(u.node, 1 - u.weight_position if u.node.op_type == "MatMul" else 0) for n in static for u in uses[n]]
            with clock("act_ranges"):
                out, act_info = add_activation_qdq(out, dict(calib_inputs), consumers, calibration=act_calibration,
                                                   num_samples=int(options.get("num_samples", 512)),  # type: ignore[call-overload]
                                                   known_ranges=captured)
            info.update(act_info)
        info["nbits_dynamic_int8_layers"] = float(len(nbits))
    info.update(clock.fields())
    return out, info


def range_candidates(model: onnx.ModelProto, names: list[str] | None) -> list[str]:
    """Tensors whose activation range the int8 QDQ placement reads: the roots of
    :func:`fls_compress.quantize.activations.plan` (each layer input followed up through value-preserving
    operators to the tensor the chain starts from, and every Conv's output, or that of its only consumer
    if a Relu). Only roots: the tensors along a chain share the root's range, so capturing them too would
    make onnxruntime hand back (and the observer scan) the same values several times."""
    from .activations import TensorGraph, conv_output, value_chain

    work = densify_sparse_initializers(model)
    _, uses = layer_sites(work, names)
    g = TensorGraph(work.graph)
    out: list[str] = []
    for us in uses.values():
        for use in us:
            out.append(value_chain(g, use.activation)[-1])
            if use.node.op_type == "Conv" and use.node.output:
                out.append(conv_output(g, use.node))
    graph_inputs = {vi.name for vi in work.graph.input} - set(g.inits)
    return [t for t in dict.fromkeys(out) if t in g.producer or t in graph_inputs]
