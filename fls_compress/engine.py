"""``compress()``: the one job behind every command (ONNX in, verified compressed ONNX and a report out).

Stages (each failure is a :class:`~fls_compress.errors.FlsError` with its exit code; a failure after
the arguments were accepted still returns a ``status: failed`` report to ``report`` when given):

1. validate everything cheap first (config, run options, paths: :func:`~fls_compress.io.paths.check_paths`);
2. load and check the model (the input file is only ever read), substitute safetensors weights;
3. load and validate calibration data (or synthesise it, with a warning) and the held-out split;
4. compress with the handler the config type selects, from what the config ``needs``: an onnx2torch
   graph (curvature methods), onnxruntime activations (layer-wise methods) or the weights alone;
5. write the new weights back into a copy of the ORIGINAL ModelProto, staged next to the output;
6. verify staged vs original with onnxruntime, apply the gates, then move the output into place
   (a failed gate leaves no model at the output path unless ``keep_failed``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from .configs import AutoConfig, MethodConfig, QuantizeConfig, RunOptions
from .configs.pruning import PruneConfig
from .errors import InvalidOptionError, OutputError, UnsupportedModelError, VerificationError
from .gates import check_gates, check_original, check_outputs_finite, non_finite_outputs, numerically_guarded
from .io.onnx_model import load_onnx, save_onnx_atomic, sparse_bytes_saved, weight_sparsity, write_back
from .io.paths import check_paths, report_path_ok
from .report import Report, collect_warnings, mark_failed, new_report, write_json_atomic
from .runtime import choose_ort_providers, file_sha256, resolve_device, seed_everything, set_threads, signals_deferred

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

SPEED_NOTE = (
    "unstructured sparsity does not make onnxruntime faster (its CPU/CUDA kernels are dense); it shrinks files only "
    "with --sparse-storage or compression. Speed comes from N:M patterns on runtimes with sparse kernels "
    "(TensorRT 2:4) and from quantization."
)


def compress(
    model: PathLike,
    config: MethodConfig,
    data: PathLike | None = None,
    *,
    output: PathLike | None = None,
    eval_data: PathLike | None = None,
    labels: PathLike | None = None,
    weights: PathLike | None = None,
    report: PathLike | None = None,
    device: str | None = None,
    options: RunOptions | None = None,
) -> Report:
    """Compress ``model`` as ``config`` says, verify it against the original and return the report.

    ``output`` is where the compressed model goes (atomically; ``None`` keeps it in memory only, as
    ``report.model``); ``report`` also receives the JSON. ``device`` (``cpu``/``cuda``/``auto``)
    overrides ``options.device``. Raises the :mod:`fls_compress.errors` types; the exception's
    ``report`` attribute holds the failure report.
    """
    opts = options or RunOptions()
    rep = new_report(config.command)
    t_start = time.perf_counter()
    inputs = {"model": model, "--data": data, "--eval-data": eval_data, "--labels": labels, "--weights": weights,
              "--recover-data": getattr(config, "recover_data", None)}
    outputs = {"-o": output, "--report": report}
    rep.update(method=config.method, config=config.to_dict(), options=opts.to_dict())
    with collect_warnings() as warnings:
        try:
            check_paths(inputs, outputs)
            _run(rep, Path(model), config, data, output, eval_data, labels, weights, device, opts, t_start)
        except BaseException as exc:
            mark_failed(rep, exc)
            rep["warnings"] = list(warnings)
            rep.setdefault("timing_s", {})["total"] = time.perf_counter() - t_start
            if report_path_ok(inputs, outputs, report):
                try:
                    write_json_atomic(rep, report)
                except OutputError as write_exc:
                    log.error("%s", write_exc)
            exc.report = rep  # type: ignore[attr-defined]
            raise
        rep["warnings"] = list(warnings)
    if report is not None:
        write_json_atomic(rep, report)
    return rep


def report_early_failure(exc: BaseException, command: str, report: PathLike | None,
                         inputs: dict[str, PathLike | None], outputs: dict[str, PathLike | None]) -> None:
    """A failure before :func:`compress` started (e.g. an invalid option): attach a failure report to
    ``exc`` and write it to ``report`` when that path is safe to write."""
    rep = mark_failed(new_report(command), exc)
    exc.report = rep  # type: ignore[attr-defined]
    if report_path_ok(inputs, outputs, report):
        try:
            write_json_atomic(rep, report)  # type: ignore[arg-type]
        except OutputError as write_exc:
            log.error("no failure report written: %s", write_exc)


def _run(
    rep: Report, model_path: Path, config: MethodConfig, data: PathLike | None, output: PathLike | None,
    eval_data: PathLike | None, labels: PathLike | None, weights_path: PathLike | None,
    device: str | None, opts: RunOptions, t_start: float,
) -> None:
    if not isinstance(config, PruneConfig):
        raise InvalidOptionError(f"{type(config).__name__} is not a pruning config")
    from .pruning.registry import make_pruner, spec_for

    c_start = time.process_time()
    dev = resolve_device(device or opts.device)
    rep["device"] = dev
    rep["onnxruntime"] = choose_ort_providers(dev)  # verification + activation capture (CPU fallback: warning)
    seed_everything(opts.seed)
    set_threads(opts.threads)

    rep["input"] = {"path": str(model_path), "sha256": file_sha256(model_path) if model_path.is_file() else None,
                    "size_bytes": model_path.stat().st_size if model_path.is_file() else None}
    proto = load_onnx(model_path)
    if weights_path is not None:
        from .io.safetensors_weights import apply_safetensors

        proto = apply_safetensors(proto, weights_path)
    session = check_original(proto, model_path if weights_path is None else None)
    if isinstance(config, AutoConfig):
        config = _resolve_auto(rep, proto, config)
    quantize = isinstance(config, QuantizeConfig)
    if quantize:
        from .quantize.qdq import refuse_quantized

        refuse_quantized(proto)
        if opts.sparse_storage:
            raise InvalidOptionError("--sparse-storage applies to prune (quantized weights are stored as integer codes)")
    else:
        pruner = make_pruner(config, opts)
        if getattr(config, "structure", "none") != "none" and opts.sparse_storage:
            raise InvalidOptionError("--sparse-storage does not apply to --structure (the tensors shrink instead)")
    spec = spec_for(config)
    from .io.splits import prepare_data

    calib, holdout = prepare_data(proto, data, eval_data, labels, opts)
    rep["calibration"] = {"source": calib.source, "num_samples": calib.num_samples, "synthetic": calib.synthetic,
                          "synthetic_shapes": calib.synthetic_shapes, "defaulted_dims": calib.defaulted_dims,
                          "constants": {k: float(v) for k, v in calib.constants.items()}}
    check_outputs_finite(session, {"calibration": calib, "verification": holdout})
    del session

    t0, c0 = time.perf_counter(), time.process_time()
    cpu = rep["timing_cpu_s"] = {"before": c0 - c_start}  # process CPU seconds (all threads) next to timing_s
    if quantize:
        from .quantize.stage import run_quantizer

        outcome = numerically_guarded(run_quantizer, proto, config, calib, dev, opts)
    else:
        from .pruning.stage import run_pruner

        outcome = numerically_guarded(run_pruner, proto, config, pruner, spec, calib, dev, opts)
    rep["timing_s"] = {"convert": outcome.convert_s, config.command: time.perf_counter() - t0 - outcome.convert_s}
    cpu["compress"] = time.process_time() - c0  # convert + the method (the converter reports wall time only)
    rep["likelihood"] = outcome.likelihood
    rep["steps"] = outcome.steps
    rep["method_info"] = outcome.info
    if "recovery" in outcome.info:  # --recover-steps: schedule, loss curves, early stops, time
        rep["recovery"] = outcome.info.pop("recovery")
    rep["conversion"] = outcome.conversion

    pruned = outcome.model if outcome.model is not None else write_back(proto, outcome.arrays, sparse=opts.sparse_storage)
    t0, c0 = time.perf_counter(), time.process_time()
    with _staged(output, pruned) as staged_path:
        from .verification import verify_models

        written = load_onnx(staged_path) if staged_path is not None else pruned
        rep["timing_s"]["write"] = time.perf_counter() - t0  # written to the staging file, read back
        cpu["write"] = time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        # onnxruntime opens the files (protobuf cannot serialise >= 2 GiB); the input file holds the
        # original weights unless --weights replaced them in memory
        rep["verification"] = verify_models(proto, written, holdout,
                                            model_paths=(model_path if weights_path is None else None, staged_path))
        rep["timing_s"]["verify"] = time.perf_counter() - t0
        cpu["verify"] = time.process_time() - c0
        rep["latency"] = latency_section(proto, written, holdout, opts, dev,
                                         (model_path if weights_path is None else None, staged_path))
        rep["timing_s"]["latency"] = time.perf_counter() - t0 - rep["timing_s"]["verify"]
        cpu["latency"] = time.process_time() - c0 - cpu["verify"]
        total = sum(meta[0] for meta in outcome.layers.values())
        if quantize:
            rep["quantization"] = quantization_section(config, outcome, proto, written, rep["latency"])
            rep["sparsity"] = {"target": spec.sparsity, "pattern": config.pattern, "prunable_weights": total,
                               "achieved": float(outcome.info.get("sparsity", 0.0)), "excluded": outcome.excluded}
            rep["notes"] = [rep["quantization"]["speed_note"]]
        elif getattr(config, "structure", "none") != "none":
            from .structured.report import structure_sections

            rep["sparsity"], rep["structure"] = structure_sections(config, outcome, proto, written, rep["latency"])
            rep["notes"] = [rep["structure"]["speed_note"]]
        else:
            per_layer = weight_sparsity(written, list(outcome.layers))
            achieved = sum(per_layer[n] * outcome.layers[n][0] for n in outcome.layers) / max(total, 1)
            rep["sparsity"] = {
                "target": spec.sparsity, "pattern": config.pattern, "achieved": achieved, "prunable_weights": total,
                "per_layer": {n: {"sparsity": per_layer[n], "numel": numel, "shape": shape, "op_type": op}
                              for n, (numel, shape, op) in outcome.layers.items()},
                "excluded": outcome.excluded,
            }
            rep["notes"] = [SPEED_NOTE] if config.pattern is None else []
        failure = non_finite_outputs(rep["verification"]) or check_gates(rep["verification"], opts)
        kept = failure is None or opts.keep_failed
        if output is not None:
            rep["output"] = {"path": str(output), "kept": kept,
                             "size_bytes": staged_path.stat().st_size if staged_path is not None else None,
                             "sparse_storage": opts.sparse_storage,
                             "sparse_bytes_saved": sparse_bytes_saved(written) if opts.sparse_storage else 0}
        else:
            rep.model = written  # type: ignore[attr-defined]
        if kept and staged_path is not None:
            _publish(staged_path, Path(output))  # type: ignore[arg-type]
    rep["timing_s"]["total"] = time.perf_counter() - t_start
    cpu["total"] = time.process_time() - c_start
    if failure is not None:
        raise VerificationError(failure)
    rep["status"] = "ok"


def _resolve_auto(rep: Report, proto: onnx.ModelProto, config: AutoConfig) -> PruneConfig:
    """``-m auto``: FLS when onnx2torch converts the graph, else SparseGPT; the choice goes in the report."""
    from .bridge.convert import convert_to_torch

    try:
        convert_to_torch(proto)
        chosen, reason = config.resolve(convertible=True), "the graph converts to torch"
    except UnsupportedModelError as exc:
        chosen, reason = config.resolve(convertible=False), f"no torch graph ({exc}); SparseGPT needs only onnxruntime"
        log.warning("-m auto: using sparsegpt because %s", reason)
    rep.update(method=chosen.method, config=chosen.to_dict(),
               method_choice={"requested": "auto", "chosen": chosen.method, "reason": reason})
    return chosen


def latency_section(original: onnx.ModelProto, written: onnx.ModelProto, holdout, opts: RunOptions, device: str,
                    paths: tuple[Path | None, Path | None] = (None, None)) -> dict[str, Any]:
    """The report's ``latency`` block (:func:`fls_compress.latency.latency_block`) on the held-out data,
    or a block that says it was skipped (``--no-latency``)."""
    from .latency import latency_block, not_measured
    from .runtime import session_providers

    if not opts.latency:
        return not_measured("--no-latency")
    refs = [p if p is not None else m for p, m in zip(paths, (original, written))]
    return latency_block(refs[0], refs[1], holdout, providers=session_providers(), runs=opts.latency_runs)


def quantization_section(config: QuantizeConfig, outcome, original: onnx.ModelProto, written: onnx.ModelProto,
                         latency: dict[str, Any]) -> dict[str, Any]:
    """Sizes, the kernels onnxruntime ended up running, and whether the quantized model is faster."""
    from .io.onnx_model import model_size_bytes

    before, after = model_size_bytes(original), model_size_bytes(written)
    faster: bool | None = None
    if latency.get("measured"):
        last = latency["batches"][-1]
        faster = last["speedup"] > 1.05
        note = f"{latency['verdict']} (median of {latency['runs']} runs)"
        kernels = (latency.get("kernels") or {}).get("compressed") or {}
        if not faster and not kernels.get("integer_kernels"):
            note += ("; onnxruntime fused no integer kernel, so the QDQ weights are dequantized to float at run time: "
                     "expect smaller files but no speed-up on this provider (--activations int8 at 8 bits gives "
                     "integer Conv/Gemm/MatMul kernels; 4-bit MatMul weights run as MatMulNBits)")
    else:
        note = "latency not measured (--no-latency)"
    return {"bits": config.bits, "granularity": config.granularity, "symmetric": config.symmetric,
            "activations": config.activations, "size_bytes": {"original": before, "quantized": after,
                                                              "ratio": after / before if before else None},
            "faster": faster, "speed_note": note,
            "opset": outcome.info.get("opset"), "opset_raised": outcome.info.get("opset_raised")}


class _staged:
    """Write the model into a hidden directory beside ``output``; removed on exit unless published."""

    def __init__(self, output: PathLike | None, model: onnx.ModelProto):
        self.output = None if output is None else Path(output)
        self.model = model
        self.dir: Path | None = None

    def __enter__(self) -> Path | None:
        if self.output is None:
            return None
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", dir=self.output.parent))
            path = self.dir / self.output.name
            save_onnx_atomic(self.model, path)
        except BaseException as exc:  # __exit__ does not run when __enter__ raises: clean up here
            self.__exit__(None, None, None)
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {self.output}: {exc.strerror or exc}") from exc
            raise
        return path

    def __exit__(self, *exc: object) -> None:
        if self.dir is not None:
            with signals_deferred():
                shutil.rmtree(self.dir, ignore_errors=True)


def _publish(staged: Path, output: Path) -> None:
    """Move the staged model (and its external-data file, if any) into place."""
    try:
        data = staged.parent / f"{staged.name}.data"
        with signals_deferred():  # the model and its external data move together or not at all
            if data.exists():
                os.replace(data, output.parent / data.name)
            os.replace(staged, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from exc


def verify(original, compressed, data=None, *, labels=None, seed: int = 0, device: str = "cpu",
           latency: bool = True, latency_runs: int | None = None) -> Report:
    """Compare two ONNX models (paths or protos) with onnxruntime on ``data`` (synthetic if ``None``),
    with the latency block (``latency=False`` skips it; ``latency_runs`` defaults to RunOptions')."""
    from .io.calibration import load_calibration
    from .verification import verify_models

    opts = RunOptions(latency=latency, latency_runs=RunOptions.default_of("latency_runs") if latency_runs is None else latency_runs)
    ref = original if isinstance(original, onnx.ModelProto) else load_onnx(original)
    new = compressed if isinstance(compressed, onnx.ModelProto) else load_onnx(compressed)
    calib = load_calibration(None if data is None else str(data), ref, seed=seed,
                             labels_path=None if labels is None else str(labels))
    rep = new_report("verify")
    paths = tuple(None if isinstance(m, onnx.ModelProto) else Path(m) for m in (original, compressed))
    rep.update(status="ok", verification=verify_models(ref, new, calib, model_paths=paths),
               latency=latency_section(ref, new, calib, opts, resolve_device(device), paths))
    return rep
