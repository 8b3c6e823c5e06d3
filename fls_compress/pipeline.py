"""The ``prune`` job end to end: ONNX file in, verified pruned ONNX file and JSON report out.

1. load and check the ONNX model (the input file is only ever read);
2. optionally substitute weights from a safetensors file;
3. load and validate calibration data (or synthesise it, with a warning);
4. convert to torch with onnx2torch and map every prunable initializer to one torch parameter;
5. choose the output likelihood that defines the Fisher (categorical / Bernoulli / Gaussian);
6. prune with the chosen method (FishLeg Surgeon by default) in place on the torch parameters;
7. write the new weights back into a copy of the ORIGINAL ModelProto (nodes, names, I/O, opset and
   metadata unchanged) and save it atomically;
8. verify original vs pruned with onnxruntime on held-out samples and report per-layer sparsity read
   back from the written file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from . import __version__
from .bridge.convert import TorchBridge, convert_to_torch
from .curvature.fishleg import FishLegConfig
from .curvature.likelihoods import Likelihood, make_likelihood
from .curvature.problem import FisherProblem
from .errors import InvalidDataError, InvalidOptionError, UnsupportedModelError, VerificationError
from .io.calibration import CalibrationData, load_calibration
from .io.onnx_model import (
    ensure_distinct_paths,
    load_onnx,
    prunable_initializers,
    save_onnx_atomic,
    sparse_bytes_saved,
    weight_sparsity,
    write_back,
)
from .progress import stage_progress
from .pruning.base import SparsitySpec
from .pruning.registry import MethodOptions, make_pruner
from .verify import verify_models

log = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    """Everything the prune job needs besides the paths (mirrors the CLI options)."""

    sparsity: float = 0.5
    method: str = "fls"
    scope: str = "global"
    pattern: str | None = None
    steps: int | None = None  # None: 1 for N:M / magnitude-style methods, 4 for OBS methods
    likelihood: str = "auto"
    output_name: str | None = None
    exclude: list[str] = field(default_factory=list)
    num_calibration: int = 1024
    holdout_fraction: float = 0.2
    batch_size: int = 64
    sparse_storage: bool = False
    seed: int = 0
    fishleg: FishLegConfig = field(default_factory=FishLegConfig)
    num_grads: int = 256
    damping: float | None = None
    min_agreement: float | None = None
    progress: bool = True
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --shape NAME=1x3x320x320
    consts: dict[str, float] = field(default_factory=dict)  # --const NAME=VALUE (rank-0 inputs)


def seed_everything(seed: int) -> None:
    """Make the run reproducible: Python, numpy and torch RNGs, deterministic torch kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_task(model: onnx.ModelProto) -> str | None:
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get("task")


def choose_likelihood(
    requested: str, model: onnx.ModelProto, bridge: TorchBridge, calib: CalibrationData, output_index: int
) -> tuple[Likelihood, str | None]:
    """Pick the likelihood and, for reconstruction models, the input that serves as target.

    ``auto``: the model's ``metadata_props["likelihood"]`` if present; labels in the data -> categorical;
    an output with the input's shape (autoencoder) -> Bernoulli when the inputs lie in [0, 1], Gaussian
    otherwise; an ``[N, C]`` output with C > 1 -> categorical (labels are sampled from the model, so
    none are needed); anything else -> Gaussian.
    """
    meta = {p.key: p.value for p in model.metadata_props}
    with torch.no_grad():
        probe = {k: torch.from_numpy(v[: min(2, calib.max_batch or 2)]) for k, v in calib.inputs.items()}
        out = bridge.forward(probe)[output_index]
    target = None
    single = next(iter(calib.inputs.values())) if len(calib.inputs) == 1 else None
    if single is not None and tuple(out.shape[1:]) == tuple(single.shape[1:]) and single.dtype.kind == "f":
        target = next(iter(calib.inputs))
    name = requested
    if requested == "auto":
        if meta.get("likelihood") in ("categorical", "bernoulli", "gaussian"):
            name = meta["likelihood"]
        elif calib.labels is not None:
            name = "categorical"
        elif target is not None or meta.get("task") == "reconstruction":
            name = "bernoulli" if float(single.min()) >= 0.0 and float(single.max()) <= 1.0 else "gaussian"
        elif out.dim() == 2 and out.shape[1] > 1:
            name = "categorical"
        else:
            name = "gaussian"
    likelihood = make_likelihood(name)
    if name == "categorical" and out.dim() < 2:
        raise InvalidOptionError(f"categorical likelihood needs class logits [N, C]; output has shape {tuple(out.shape)}")
    if name == "categorical":
        target = None  # class labels, when present, come from the data, never from an input
    return likelihood, target


def is_excluded(name: str, patterns: list[str]) -> bool:
    """Whether an initializer name matches any ``--exclude`` glob."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def select_weights(bridge: TorchBridge, exclude: list[str]) -> dict[str, Any]:
    """Prunable weights minus those matching any ``--exclude`` glob; frozen ones stop requiring grad."""
    chosen = {}
    for name, w in bridge.weights.items():
        if is_excluded(name, exclude):
            w.parameter.requires_grad_(False)
            continue
        chosen[name] = w
    if not chosen:
        raise UnsupportedModelError("no prunable Conv/Gemm/MatMul weights left to prune" + (" after --exclude" if exclude else ""))
    return chosen


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def prepare_data(
    model: onnx.ModelProto, data: str | None, eval_data: str | None, labels: str | None, opts: PruneOptions
) -> tuple[CalibrationData, CalibrationData]:
    """Calibration set and held-out verification set (a split of the calibration data if no eval data)."""
    calib = load_calibration(data, model, seed=opts.seed, labels_path=labels, num_synthetic=max(opts.num_calibration, 2),
                             shapes=opts.shapes, consts=opts.consts)
    if eval_data is not None:
        holdout = load_calibration(eval_data, model, seed=opts.seed, shapes=opts.shapes, consts=opts.consts)
    else:
        calib, holdout = calib.split(opts.holdout_fraction, seed=opts.seed)
    if calib.num_samples > opts.num_calibration:
        calib = calib.subset(opts.num_calibration)
    return calib, holdout


def prune_model(
    input_path: str,
    output_path: str,
    *,
    data: str | None = None,
    eval_data: str | None = None,
    labels: str | None = None,
    weights_path: str | None = None,
    report_path: str | None = None,
    options: PruneOptions | None = None,
) -> dict[str, Any]:
    """Run the whole prune job and return the JSON report (also written to ``report_path``)."""
    opts = options or PruneOptions()
    t_start = time.perf_counter()
    spec = SparsitySpec(opts.sparsity, scope=opts.scope, pattern=opts.pattern, steps=opts.steps or 1)
    ensure_distinct_paths(input_path, output_path)
    if report_path is not None:
        ensure_distinct_paths(input_path, report_path)
    method_opts = MethodOptions(fishleg=opts.fishleg, damping=opts.damping, num_grads=opts.num_grads, num_samples=opts.num_calibration)
    pruner = make_pruner(opts.method, method_opts)
    if spec.nm is not None and not pruner.supports_pattern:
        raise InvalidOptionError(f"method {opts.method!r} does not support N:M patterns")
    seed_everything(opts.seed)
    input_hash = file_sha256(input_path) if os.path.isfile(input_path) else None
    model = load_onnx(input_path)
    if weights_path is not None:
        from .io.safetensors_weights import apply_safetensors

        model = apply_safetensors(model, weights_path)
    calib, holdout = prepare_data(model, data, eval_data, labels, opts)

    activations_only = bool(getattr(pruner, "needs_onnx_model", False))
    if activations_only:
        pruner.bind(model)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    try:
        bridge: TorchBridge | None = convert_to_torch(model, calibration=calib)
    except UnsupportedModelError as exc:
        if not activations_only:
            raise
        log.warning("%s; %s works from onnxruntime activations alone, continuing without torch", exc, opts.method)
        bridge = None
    convert_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if bridge is None:
        layers = _onnx_layers(model, opts.exclude)
        with stage_progress(len(layers), f"pruning with {opts.method}", enabled=opts.progress) as advance:
            arrays = pruner.prune_arrays(calib.inputs, spec, names=list(layers))  # type: ignore[attr-defined]
            advance(f"{opts.method}: done")
        steps, info, likelihood_name, excluded = [{"target": spec.sparsity}], {"torch_free": "yes"}, None, []
    else:
        if opts.steps is None and spec.nm is None and getattr(pruner, "estimator", None) is not None:
            spec.steps = 4
        problem = _build_problem(model, bridge, calib, opts)
        likelihood_name = problem.likelihood.name
        with stage_progress(len(spec.schedule()), f"pruning with {opts.method}", enabled=opts.progress) as advance:
            result = pruner.prune(problem, spec, advance)
        arrays = {name: w.to_onnx() for name, w in problem.weights.items()}
        layers = {n: (w.numel, list(w.onnx_shape), w.op_type) for n, w in problem.weights.items()}
        steps, info = [asdict(st) for st in result.steps], result.info
        excluded = sorted(set(bridge.weights) - set(problem.weights))
    prune_s = time.perf_counter() - t0

    pruned_model = write_back(model, arrays, sparse=opts.sparse_storage)
    save_onnx_atomic(pruned_model, output_path)

    t0 = time.perf_counter()
    written = load_onnx(output_path)
    per_layer = weight_sparsity(written, list(layers))
    verification = verify_models(model, written, holdout, task=model_task(model))
    verify_s = time.perf_counter() - t0

    total = sum(meta[0] for meta in layers.values())
    achieved = sum(per_layer[n] * layers[n][0] for n in layers) / max(total, 1)
    report: dict[str, Any] = {
        "tool": {"name": "fls-compress", "version": __version__},
        "command": "prune",
        "status": "ok",
        "input": {"path": str(input_path), "sha256": input_hash, "size_bytes": os.path.getsize(input_path)},
        "output": {
            "path": str(output_path),
            "size_bytes": os.path.getsize(output_path),
            "sparse_storage": opts.sparse_storage,
            "sparse_bytes_saved": sparse_bytes_saved(written) if opts.sparse_storage else 0,
        },
        "method": opts.method,
        "likelihood": likelihood_name,
        "seed": opts.seed,
        "options": _options_dict(opts, spec),
        "calibration": {"source": calib.source, "num_samples": calib.num_samples, "synthetic": calib.synthetic,
                        "synthetic_shapes": calib.synthetic_shapes, "defaulted_dims": calib.defaulted_dims},
        "conversion": bridge.info if bridge is not None else None,
        "sparsity": {
            "target": spec.sparsity,
            "pattern": opts.pattern,
            "achieved": achieved,
            "prunable_weights": total,
            "per_layer": {
                n: {"sparsity": per_layer[n], "numel": numel, "shape": shape, "op_type": op}
                for n, (numel, shape, op) in layers.items()
            },
            "excluded": excluded,
        },
        "steps": steps,
        "method_info": info,
        "timing_s": {"convert": convert_s, "prune": prune_s, "verify": verify_s, "total": time.perf_counter() - t_start},
        "verification": verification,
    }
    failure = _check_thresholds(report, opts)
    if failure:
        report["status"] = "failed"
        report["failure"] = failure
    if report_path is not None:
        write_json_atomic(report, report_path)
    if failure:
        raise VerificationError(failure)
    return report


def _build_problem(model: onnx.ModelProto, bridge: TorchBridge, calib: CalibrationData, opts: PruneOptions) -> FisherProblem:
    """The FisherProblem for the converted model: chosen output, likelihood and prunable weights."""
    output_index = 0
    if opts.output_name is not None:
        if opts.output_name not in bridge.output_names:
            raise InvalidOptionError(f"model has no output {opts.output_name!r}; outputs are {bridge.output_names}")
        output_index = bridge.output_names.index(opts.output_name)
    weights = select_weights(bridge, opts.exclude)
    likelihood, target_input = choose_likelihood(opts.likelihood, model, bridge, calib, output_index)
    log.info(
        "calibrating on %d samples (%s), likelihood %s, %d prunable tensors (%d weights)",
        calib.num_samples, calib.source, likelihood.name, len(weights), sum(w.numel for w in weights.values()),
    )
    return FisherProblem(
        forward=bridge.forward,
        weights=weights,
        inputs=calib.inputs,
        likelihood=likelihood,
        labels=calib.labels,
        output_index=output_index,
        batch_size=opts.batch_size,
        seed=opts.seed,
        targets_from_input=target_input,
    )


def _onnx_layers(model: onnx.ModelProto, exclude: list[str]) -> dict[str, tuple[int, list[int], str]]:
    """Prunable initializers read from the graph alone (for the torch-free layer-wise path)."""
    layers = {
        s.name: (int(np.prod(s.shape)), list(s.shape), s.op_type)
        for s in prunable_initializers(model)
        if not is_excluded(s.name, exclude)
    }
    if not layers:
        raise UnsupportedModelError("no prunable Conv/Gemm/MatMul weights to prune")
    return layers


def _check_thresholds(report: dict[str, Any], opts: PruneOptions) -> str | None:
    if opts.min_agreement is None:
        return None
    for name, out in report["verification"]["outputs"].items():
        agreement = out.get("top1_agreement")
        if agreement is not None and agreement < opts.min_agreement:
            return f"top-1 agreement on output '{name}' is {agreement:.4f}, below --min-agreement {opts.min_agreement}"
    return None


def _options_dict(opts: PruneOptions, spec: SparsitySpec) -> dict[str, Any]:
    d = asdict(opts)
    d["steps"] = spec.steps
    d.pop("progress", None)
    return d
