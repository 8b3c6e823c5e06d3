"""Bind a pruner to a model and its calibration data, by what the method's config ``needs``.

* ``torch``: onnx2torch graph -> :class:`~fls_compress.curvature.problem.FisherProblem` (gradients,
  Fisher products) with the likelihood :func:`~fls_compress.task.infer_task` chooses;
* ``activations``: layer inputs captured with onnxruntime, no torch graph (serves graphs onnx2torch
  cannot convert);
* nothing: the weights alone, read from the ONNX file (magnitude).

Returns the pruned arrays in ONNX layout, keyed by weight name, plus what the report needs.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from ..bridge.weights import PrunableWeight
from ..configs import ACTIVATIONS, TORCH, RunOptions
from ..configs.pruning import CurvatureConfig, PruneConfig
from ..curvature.likelihoods import make_likelihood
from ..curvature.problem import FisherProblem
from ..errors import InvalidOptionError, UnsupportedModelError
from ..io.calibration import CalibrationData
from ..io.onnx_model import prunable_initializers, read_weight
from ..progress import stage_progress
from ..task import infer_task
from .base import Pruner, SparsitySpec

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    arrays: dict[str, np.ndarray]
    layers: dict[str, tuple[int, list[int], str]]  # name -> (numel, ONNX shape, op type)
    excluded: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    likelihood: str | None = None
    convert_s: float = 0.0
    model: onnx.ModelProto | None = None  # a whole new graph (quantize); None: write ``arrays`` back
    conversion: dict[str, Any] | None = None  # what the onnx2torch bridge did (bridge.info)


def is_excluded(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a weight name matches any ``exclude`` glob."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def run_pruner(
    model: onnx.ModelProto, config: PruneConfig, pruner: Pruner, spec: SparsitySpec, calib: CalibrationData,
    device: str, opts: RunOptions,
) -> Outcome:
    if getattr(config, "structure", "none") != "none":
        if getattr(config, "recovering", False):
            from ..recovery.structured import run_structured_recovery

            return run_structured_recovery(model, config, calib, device, opts)
        from ..structured.stage import run_structured

        return run_structured(model, config, calib, opts)
    if TORCH in config.needs:
        return _with_torch(model, config, pruner, spec, calib, device, opts)
    if ACTIVATIONS in config.needs:
        return _with_activations(model, config, pruner, spec, calib, opts)
    return _weights_only(model, config, pruner, spec, calib, device, opts)


def _layers(weights: dict[str, PrunableWeight]) -> dict[str, tuple[int, list[int], str]]:
    return {n: (w.numel, list(w.onnx_shape), w.op_type) for n, w in weights.items()}


def _select(weights: dict[str, PrunableWeight], exclude: tuple[str, ...]) -> tuple[dict[str, PrunableWeight], list[str]]:
    chosen = {n: w for n, w in weights.items() if not is_excluded(n, exclude)}
    excluded = sorted(set(weights) - set(chosen))
    for n in excluded:
        weights[n].parameter.requires_grad_(False)
    if not chosen and weights:
        raise InvalidOptionError(f"--exclude {' '.join(exclude)} matches every prunable weight ({len(weights)}); nothing left to prune")
    if not chosen:
        raise UnsupportedModelError("no prunable Conv/Gemm/MatMul weights to prune")
    return chosen, excluded


def _run_steps(pruner: Pruner, problem: FisherProblem, spec: SparsitySpec, opts: RunOptions) -> tuple[list, dict]:
    from dataclasses import asdict

    with stage_progress(len(spec.schedule()), f"pruning with {pruner.name}", enabled=opts.progress) as advance:
        result = pruner.prune(problem, spec, advance)
    info = dict(result.info)
    layer_info = getattr(getattr(pruner, "estimator", None), "layer_info", None)
    if layer_info:
        info["per_layer"] = layer_info
    if problem.per_example_info:
        info["per_example_gradients"] = problem.per_example_info
    return [asdict(st) for st in result.steps], info


def _run_gradual(model, config, pruner, problem: FisherProblem, spec: SparsitySpec, likelihood: str,
                 opts: RunOptions) -> tuple[list, dict]:
    """``--recover-steps``: gradual pruning with distillation (:mod:`fls_compress.recovery.gradual`)."""
    from ..io.calibration import load_calibration
    from ..recovery.gradual import run_gradual

    settings = config.recovery_settings
    extra = None
    if settings["data"] is not None:
        extra = load_calibration(settings["data"], model, seed=opts.seed, shapes=opts.shapes, consts=opts.consts)
    steps, info = run_gradual(pruner, problem, spec, settings, likelihood, extra, opts.seed, opts.progress)
    if problem.per_example_info:
        info["per_example_gradients"] = problem.per_example_info
    layer_info = getattr(getattr(pruner, "estimator", None), "layer_info", None)
    if layer_info:
        info["per_layer"] = layer_info
    return steps, info


def build_problem(model, config, calib, device, opts) -> tuple[FisherProblem, Any, list[str], float]:
    """onnx2torch graph -> FisherProblem with the likelihood :func:`infer_task` picks (and what it excluded)."""
    from ..bridge.convert import convert_to_torch

    t0 = time.perf_counter()
    bridge = convert_to_torch(model, calibration=calib, tolerance=opts.conversion_tol,  # its error names the methods
                              on_mismatch="warn" if opts.allow_conversion_mismatch else "fail")  # that need no torch graph
    convert_s = time.perf_counter() - t0
    if device != "cpu":
        bridge.module.to(device)
    weights, excluded = _select(bridge.weights, config.exclude)
    output_index = 0
    output_name = getattr(config, "output_name", None)
    if output_name is not None:
        if output_name not in bridge.output_names:
            from ..errors import InvalidOptionError

            raise InvalidOptionError(f"model has no output {output_name!r}; outputs are {bridge.output_names}")
        output_index = bridge.output_names.index(output_name)
    n_probe = min(2, calib.max_batch or 2)
    with torch.no_grad():
        probe = {k: torch.from_numpy(v[:n_probe]).to(device) for k, v in calib.inputs.items()}
        out = bridge.forward(probe)[output_index].detach().cpu().numpy()
    guess = infer_task({p.key: p.value for p in model.metadata_props}, {k: v[:n_probe] for k, v in calib.inputs.items()},
                       out, has_labels=calib.labels is not None, likelihood=getattr(config, "likelihood", "auto"))
    labels = calib.labels
    if labels is not None and guess.likelihood != "categorical":
        log.warning("the data's class labels do not fit the %s likelihood; targets are sampled from the model instead",
                    guess.likelihood)
        labels = None
    log.info("calibrating on %d samples (%s), likelihood %s, %d prunable tensors (%d weights)", calib.num_samples,
             calib.source, guess.likelihood, len(weights), sum(w.numel for w in weights.values()))
    problem = FisherProblem(
        forward=bridge.forward, weights=weights, inputs=calib.inputs, likelihood=make_likelihood(guess.likelihood),
        labels=labels, output_index=output_index, batch_size=getattr(config, "batch_size", 64), seed=opts.seed,
        targets_from_input=guess.target_input, module=bridge.module, max_batch=calib.max_batch,
    )
    problem.conversion = bridge.info  # type: ignore[attr-defined]
    return problem, guess, excluded, convert_s


def _with_torch(model, config: CurvatureConfig, pruner, spec, calib, device, opts) -> Outcome:
    problem, guess, excluded, convert_s = build_problem(model, config, calib, device, opts)
    if getattr(config, "recovering", False):
        steps, info = _run_gradual(model, config, pruner, problem, spec, guess.likelihood, opts)
    else:
        steps, info = _run_steps(pruner, problem, spec, opts)
    arrays = {name: w.to_onnx() for name, w in problem.weights.items()}
    return Outcome(arrays, _layers(problem.weights), excluded, steps, info, guess.likelihood, convert_s,
                   conversion=problem.conversion)


def _with_activations(model, config: PruneConfig, pruner, spec, calib, opts) -> Outcome:
    sites = [s for s in prunable_initializers(model)]
    names = [s.name for s in sites if not is_excluded(s.name, config.exclude)]
    if not names:
        raise UnsupportedModelError("no prunable Conv/Gemm/MatMul weights to prune" + (" after --exclude" if config.exclude else ""))
    from ..bridge.prep import constants_to_initializers

    # same weight names; write-back targets the original Constant nodes, rank-0 inputs become constants
    pruner.bind(bind_constants(constants_to_initializers(model), calib.constants))
    with stage_progress(1, f"pruning with {pruner.name}", enabled=opts.progress) as advance:
        arrays = pruner.prune_arrays(calib.inputs, spec, names=names)  # type: ignore[attr-defined]
        advance(f"{pruner.name}: done")
    layers = {s.name: (int(np.prod(s.shape)), list(s.shape), s.op_type) for s in sites if s.name in names}
    info = {"num_samples": min(calib.num_samples, opts.num_calibration), "sequential": bool(getattr(config, "sequential", False)),
            "allocation": "uniform per layer (the method's design)", **getattr(pruner, "last_info", {})}
    return Outcome(arrays, layers, sorted(s.name for s in sites if s.name not in names), [{"target": spec.sparsity}], info)


def bind_constants(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy where each rank-0 input given as a constant is an initializer instead (for onnxruntime capture)."""
    if not constants:
        return model
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [vi for vi in out.graph.input if vi.name not in constants]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    for name, value in constants.items():
        dtype = next((helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in model.graph.input
                      if vi.name == name), np.asarray(value).dtype)
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return out


def onnx_weights(model: onnx.ModelProto) -> dict[str, PrunableWeight]:
    """Prunable weights read straight from the ONNX arrays (no torch graph), with their matrix view."""
    labels = {(n.name or f"{n.op_type}_{i}"): n for i, n in enumerate(model.graph.node)}
    out: dict[str, PrunableWeight] = {}
    for site in prunable_initializers(model):
        arr = read_weight(model, site.name)
        node = labels.get(site.node_names[0])
        if site.op_type == "MatMul":
            matrix_transpose = site.input_index == 1
        elif site.op_type == "Gemm":
            trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0) if node else 0
            matrix_transpose = not trans_b
        else:
            matrix_transpose = False
        param = torch.nn.Parameter(torch.from_numpy(arr.astype(np.float64)), requires_grad=False)
        out[site.name] = PrunableWeight(site.name, site.op_type, param, tuple(arr.shape), arr.dtype,
                                        matrix_transpose=matrix_transpose, consumers=site.node_names)
    return out


def _weights_only(model, config: PruneConfig, pruner, spec, calib, device, opts) -> Outcome:
    """Magnitude: the weights as the torch bridge maps them (LSTM/GRU, folded If branches, Constant nodes);
    from the ONNX arrays alone when the graph does not convert (warning + ``torch_free`` in the report)."""
    t0 = time.perf_counter()
    conversion = None
    try:
        from ..bridge.convert import convert_to_torch

        # the graph only maps the weights here: a numerical mismatch does not matter (a warning)
        bridge = convert_to_torch(model, calibration=calib, tolerance=opts.conversion_tol, on_mismatch="warn")
        all_weights, conversion = bridge.weights, bridge.info
    except UnsupportedModelError as exc:
        log.warning("%s works from the ONNX weights alone: %s", pruner.name, exc)
        all_weights = onnx_weights(model)
        conversion = {"torch_free": str(exc)}
    weights, excluded = _select(all_weights, config.exclude)
    problem = FisherProblem(forward=None, weights=weights, inputs={}, likelihood=None)  # type: ignore[arg-type]
    steps, info = _run_steps(pruner, problem, spec, opts)
    arrays = {name: w.to_onnx() for name, w in problem.weights.items()}
    return Outcome(arrays, _layers(problem.weights), excluded, steps, info, None, time.perf_counter() - t0,
                   conversion=conversion)
