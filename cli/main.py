"""``fls-compress`` command line: thin Typer commands over :func:`fls_compress.compress`.

Conventions for pipelines: no prompts; results (strict JSON) on stdout, logs and progress on stderr;
one ``error: ...`` line and a documented exit code for every failure: 2 bad option or usage, 3 bad
model file, 4 unsupported model, 5 bad data, 6 verification gate failed, 7 output not writable,
130/143 interrupted (SIGINT/SIGTERM), 1 internal error (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fls_compress import __version__
from fls_compress.errors import FlsError, Interrupted

from . import commands
from .output import emit_report

app = typer.Typer(
    name="fls-compress",
    help="Second-order (FishLeg Surgeon) compression of existing ONNX models, verified with onnxruntime.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

_DEBUG = {"on": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fls-compress {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-vv for debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for internal errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    from fls_compress.progress import attach_cli_logging

    if ctx.invoked_subcommand is None:
        raise _UsageError("no command given; run 'fls-compress --help' for the commands")
    ctx.call_on_close(attach_cli_logging(verbose, quiet))  # the handler lives for this invocation only
    _DEBUG["on"] = debug


class _UsageError(FlsError):
    exit_code = 2


commands.register(app, "prune")
commands.register(app, "quantize")


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="ONNX model to inspect.", show_default=False)]) -> None:
    """List the prunable weights and any operators that cannot be converted (JSON on stdout)."""
    import math

    from fls_compress.bridge.convert import unsupported_ops
    from fls_compress.bridge.prep import prepare_for_torch
    from fls_compress.bridge.support import converter_sources
    from fls_compress.io.onnx_model import load_onnx, model_size_bytes, prunable_initializers

    proto = load_onnx(model)
    sites = prunable_initializers(proto)
    prepared = prepare_for_torch(proto)
    missing = unsupported_ops(prepared)
    info = {
        "path": str(model),
        "opset": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "size_bytes": model_size_bytes(proto),
        "prunable": [{"name": s.name, "op_type": s.op_type, "shape": list(s.shape),
                      "storage": getattr(s, "storage", "initializer")} for s in sites],
        "prunable_weights": sum(math.prod(s.shape) for s in sites),
        "unsupported_ops": missing,
        "converters": converter_sources(prepared),
        "methods_available": ["all"] if not missing else ["sparsegpt", "wanda", "magnitude", "auto"],
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }
    typer.echo(json.dumps(info, indent=2))


@app.command()
def verify(
    original: Annotated[Path, typer.Argument(help="Reference ONNX model.", show_default=False)],
    compressed: Annotated[Path, typer.Argument(help="Compressed ONNX model.", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Inputs to compare on (.npz / .npy / directory); synthetic if omitted.")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Class labels (.npy) for accuracy.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", "-r", help="Also write the JSON report here.")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of synthetic inputs.")] = 0,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time both models with onnxruntime (batch 1 and the evaluation batch) and census the kernels it runs.")] = True,
    latency_runs: Annotated[Optional[int], typer.Option("--latency-runs", help="Timed runs per model and batch [1<=x<=10000].")] = None,
) -> None:
    """Compare two ONNX models with onnxruntime (output errors, agreement, accuracy, size, latency)."""
    from fls_compress.engine import verify as verify_job
    from fls_compress.io.paths import check_paths
    from fls_compress.report import Report, write_json_atomic

    check_paths({"original": original, "compressed": compressed, "--data": data, "--labels": labels}, {"--report": report})
    result: Report = verify_job(original, compressed, data, labels=labels, seed=seed, latency=latency,
                                latency_runs=latency_runs)
    if report is not None:
        write_json_atomic(result, report)
    emit_report(result)


@app.command()
def methods() -> None:
    """List the compression methods with what each needs."""
    from fls_compress.configs import config_types

    for cls in config_types().values():
        needs = ", ".join(sorted(cls.needs)) or "weights only"
        typer.echo(f"{cls.command:9s} {cls.method:10s} {cls.summary}  (needs: {needs})")


@app.command()
def job(spec: Annotated[Path, typer.Argument(help="Job spec (JSON): command, model, output, report, data, config, options.", show_default=False)]) -> None:
    """Run one job spec (what `batch` runs per model; `config.to_dict()` round-trips into it)."""
    from fls_compress.jobspec import run_spec_file

    emit_report(run_spec_file(spec))


try:  # the batch command lives in its own module
    from . import batch as _batch

    _batch.register(app)
except ImportError:  # pragma: no cover
    pass


def _on_signal(signum: int, frame: object) -> None:
    """First SIGINT/SIGTERM: raise :class:`Interrupted` where the main thread is; later ones are ignored so
    the cleanup the first one starts (staging directories, temp files, the failure report) completes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Interrupted(signum)


def _usage_error_type() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(mod, fromlist=["ClickException"])
            types.append(module.ClickException)
        except ImportError:
            continue
    return tuple(types)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: every failure is one ``error:`` line and its exit code."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    click_errors = _usage_error_type()
    try:
        rc = app(args=argv, prog_name="fls-compress", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except FlsError as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            print(report.to_json())
        from fls_compress.errors import first_line

        _fail(first_line(exc), exc.exit_code)
    except click_errors as exc:  # usage errors: unknown option, bad value, missing argument
        code = getattr(exc, "exit_code", 2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)  # type: ignore[attr-defined]
        _fail(" ".join(message.split()) or type(exc).__name__, code if code else 2)
    except (typer.Exit, typer.Abort) as exc:
        code = getattr(exc, "exit_code", 1)
        sys.exit(code)
    except Interrupted as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            print(report.to_json())
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted by SIGINT", 130)
    except Exception as exc:  # genuine bugs
        if _DEBUG["on"]:
            raise
        logging.getLogger("fls_compress").debug("internal error", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug for details", 1)


if __name__ == "__main__":
    run()
