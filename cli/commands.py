"""``fls-compress prune`` and ``quantize``: options generated from the method configs and the run options."""

from __future__ import annotations

import inspect
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fls_compress.configs import DEFAULT_METHODS, RunOptions, config_types

from .options import knob_params, plain, split_knobs, with_signature
from .output import emit_report

_KW = inspect.Parameter.KEYWORD_ONLY


def path_params(command: str) -> list[inspect.Parameter]:
    """Model argument and the file options every compression command takes."""
    P = inspect.Parameter
    return [
        P("model", P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(help="Input ONNX model (never modified).", show_default=False)]),
        P("output", _KW, annotation=Annotated[Path, typer.Option("--output", "-o", help=f"Where to write the {command}d ONNX model (atomic).", show_default=False)]),
        P("data", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option("--data", "-d", help="Calibration data: .npz keyed by input name (optional 'labels'), .npy, or a directory of them. Omitted: synthetic inputs (rough).")]),
        P("eval_data", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option("--eval-data", help="Held-out data for verification (default: a hold-out split of --data).")]),
        P("labels", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option("--labels", help="Class labels (.npy) for --data, if not inside the .npz.")]),
        P("weights", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option("--weights", help="safetensors file whose tensors replace the model's weights first.")]),
        P("report", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option("--report", "-r", help="Also write the JSON report here (written on failure too).")]),
    ]


def run_options(values: dict[str, Any]) -> RunOptions:
    return RunOptions(**{k: plain(v) for k, v in values.items() if v is not None})


def register(app: typer.Typer, command: str) -> None:
    """Add ``command`` (prune / quantize) with one option per knob of its method configs."""
    types = config_types(command)
    classes = list(types.values())
    method_enum = Enum(f"{command}_method", {name: name for name in types}, type=str)  # type: ignore[misc]
    run_names = [f.name for f in RunOptions.knobs()]
    params = path_params(command) + [
        inspect.Parameter("method", _KW, default=method_enum(DEFAULT_METHODS[command]), annotation=Annotated[
            method_enum, typer.Option("--method", "-m", help=f"{command.capitalize()} method (see `fls-compress methods`).",
                                      rich_help_panel="Pruning target" if command == "prune" else "Quantization")]),
    ] + knob_params(classes) + knob_params([RunOptions], list_methods=False)

    def run(**kw: Any) -> None:
        from fls_compress.engine import compress, report_early_failure
        from fls_compress.errors import FlsError

        method = plain(kw.pop("method"))
        paths = {k: kw.pop(k) for k in ("model", "output", "data", "eval_data", "labels", "weights", "report")}
        try:
            opts = run_options({k: kw.pop(k) for k in run_names})
            config = split_knobs(types[method], kw, classes)
        except FlsError as exc:
            inputs = {"model": paths["model"], "--data": paths["data"], "--eval-data": paths["eval_data"],
                      "--labels": paths["labels"], "--weights": paths["weights"]}
            report_early_failure(exc, command, paths["report"], inputs, {"-o": paths["output"]})
            raise
        report = compress(paths["model"], config, paths["data"], output=paths["output"], eval_data=paths["eval_data"],
                          labels=paths["labels"], weights=paths["weights"], report=paths["report"], options=opts)
        emit_report(report)

    run.__doc__ = {
        "prune": "Prune MODEL to the target sparsity, write the weights back into the original graph and verify with onnxruntime.",
        "quantize": "Quantize MODEL's weights (int8/int4, OBS-compensated; optionally pruned in the same sweep) as QDQ ONNX, "
                    "verified with onnxruntime.",
    }[command]
    app.command(command)(with_signature(run, params))
