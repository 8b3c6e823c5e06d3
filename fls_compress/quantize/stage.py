"""Bind a quantization config to a model and its calibration data (the quantize half of ``compress``).

``rtn`` needs the weights alone (activations only for ``activations=int8``), ``gptq`` the layer inputs
captured with onnxruntime, ``fls`` the FishLeg fit on the torch graph: its Kronecker factor gives
every layer's sweep factor U = chol(L L^T) and row scaling D_A (see :func:`fls_curvature`).
"""

from __future__ import annotations

import logging
import time

import onnx

from ..configs import FLSQuantConfig, GPTQConfig, QuantizeConfig, RunOptions
from ..errors import InvalidOptionError
from ..io.calibration import CalibrationData
from ..io.onnx_model import prunable_initializers
from ..pruning.stage import Outcome, build_problem, is_excluded
from .model import quantize_model

log = logging.getLogger(__name__)


def fls_curvature(model: onnx.ModelProto, config: FLSQuantConfig, calib: CalibrationData, device: str,
                  opts: RunOptions) -> tuple[dict, dict, str, float]:
    """FishLeg fit on the torch graph -> {weight: (U, row_scale)}, fit info, likelihood, conversion seconds."""
    from ..curvature.fishleg import FishLegConfig, FishLegEstimator

    problem, guess, _excluded, convert_s = build_problem(model, config, calib, device, opts)
    estimator = FishLegEstimator(FishLegConfig(
        form="kron", damping=config.damping, relative_damping=config.gamma_relative, init=config.q_init,
        fit_steps=config.fit_steps, refit_steps=0, aux_batch=config.batch_size, lr=config.aux_lr, probes=config.probes,
        fit_seconds=config.fit_seconds, precondition=config.precondition, diag_samples=config.moment_samples,
        fast_matmul=config.fit_matmul == "fast",
    ))
    stats = estimator.fit(problem)
    curvature = {name: estimator.sweep_factors(name) for name in problem.weights}
    info = {"fit_seconds": stats.seconds, "fit_steps": stats.steps, **{k: v for k, v in stats.extra.items()}}
    return curvature, info, guess.likelihood, convert_s


def run_quantizer(model: onnx.ModelProto, config: QuantizeConfig, calib: CalibrationData, device: str,
                  opts: RunOptions) -> Outcome:
    sites = prunable_initializers(model)
    names = [s.name for s in sites if not is_excluded(s.name, config.exclude)]
    excluded = sorted(s.name for s in sites if s.name not in names)
    if sites and not names:
        raise InvalidOptionError(f"--exclude {' '.join(config.exclude)} matches every quantizable weight ({len(sites)}); nothing left to quantize")
    curvature, likelihood, convert_s, fit_info = None, None, 0.0, {}
    options: dict[str, object] = {"num_samples": opts.num_calibration}
    if isinstance(config, GPTQConfig):
        options.update(percdamp=config.percdamp, block_size=config.lazy_block, sequential=config.sequential,
                       max_rows_per_layer=config.rows_per_layer, shrinkage=config.hessian_shrinkage)
    if isinstance(config, FLSQuantConfig):
        t0 = time.perf_counter()
        curvature, fit_info, likelihood, convert_s = fls_curvature(model, config, calib, device, opts)
        options.update(block_size=config.lazy_block)
        log.info("fls: FishLeg curvature for %d weights in %.1fs", len(curvature), time.perf_counter() - t0)
    needs_data = config.method == "gptq" or config.activations != "none"
    from ..bridge.prep import constants_to_initializers
    from ..pruning.stage import bind_constants

    base = constants_to_initializers(model)
    qmodel, info = quantize_model(
        bind_constants(base, calib.constants) if needs_data else base, calib.inputs if needs_data else None, method=config.method, bits=config.bits,
        granularity=config.grid_granularity, symmetric=config.symmetric, sparsity=config.sparsity, pattern=config.pattern,
        act_order=getattr(config, "act_order", False), activations=config.activations,
        act_calibration=config.act_calibration, matmul_format=config.matmul_format, names=names, seed=opts.seed,
        curvature=curvature, **options,
    )
    if needs_data and calib.constants:  # the rank-0 inputs were bound for capture only: inputs again
        kept = [t for t in qmodel.graph.initializer if t.name not in calib.constants]
        del qmodel.graph.initializer[:]
        qmodel.graph.initializer.extend(kept)
        del qmodel.graph.input[:]
        qmodel.graph.input.extend(model.graph.input)
    info.update(fit_info)
    layers = {s.name: (int(__import__("math").prod(s.shape)), list(s.shape), s.op_type) for s in sites if s.name in names}
    return Outcome({}, layers, excluded, [], dict(info), likelihood, convert_s, model=qmodel)
