"""``fls-compress`` command line: thin Typer commands over the library.

Conventions for pipelines: no prompts; results (JSON) on stdout, logs and progress on stderr; a
one-line ``error: ...`` and a distinct non-zero exit code for every user error
(2 bad option, 3 bad model file, 4 unsupported model, 5 bad data, 6 verification failed,
1 internal error - rerun with ``--debug`` for the traceback).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from fls_compress import __version__
from fls_compress.errors import FlsError

app = typer.Typer(
    name="fls-compress",
    help="Second-order (FishLeg Surgeon) compression of existing ONNX models, verified with onnxruntime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": False}


class Likelihood(str, Enum):
    auto = "auto"
    categorical = "categorical"
    bernoulli = "bernoulli"
    gaussian = "gaussian"


class Scope(str, Enum):
    global_ = "global"
    layer = "layer"


class QForm(str, Enum):
    kron = "kron"
    block = "block"


class ObsUpdate(str, Enum):
    row_exact = "row-exact"
    decoupled = "decoupled"


class QInit(str, Enum):
    kfac = "kfac"
    diag = "diag"
    identity = "identity"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fls-compress {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output on stderr (-vv for debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    from fls_compress.progress import configure_logging

    configure_logging(verbose, quiet)
    _DEBUG["on"] = debug


@app.command()
def prune(
    model: Path = typer.Argument(..., help="Input ONNX model (never modified)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the pruned ONNX model (atomic)."),
    sparsity: float = typer.Option(0.5, "--sparsity", "-s", help="Target fraction of zeros in the prunable weights, in [0, 1)."),
    method: str = typer.Option("fls", "--method", "-m", help="fls (FishLeg Surgeon), magnitude, obert, mfac, ief, sparsegpt, wanda."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Calibration data: .npz keyed by input name (optional 'labels'), .npy, or a directory of them. Omitted: synthetic inputs (rough)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out data for verification (default: 20% of --data)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class labels (.npy) for --data, if not inside the .npz."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors file whose tensors replace the model's initializers first."),
    report: Optional[Path] = typer.Option(None, "--report", "-r", help="Write the JSON report here (it is also printed on stdout)."),
    scope: Scope = typer.Option(Scope.global_, "--scope", help="global: rank all layers together; layer: same sparsity per layer."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="Semi-structured N:M sparsity, e.g. 2:4 (overrides --sparsity)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Pruning sub-steps with curvature refits in between (default 4 for OBS methods)."),
    likelihood: Likelihood = typer.Option(Likelihood.auto, "--likelihood", help="Output likelihood defining the Fisher."),
    output_name: Optional[str] = typer.Option(None, "--output-name", help="Model output the likelihood applies to (default: the first)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob of initializer names to keep dense (repeatable)."),
    num_calibration: int = typer.Option(1024, "--num-calibration", help="Calibration samples used at most."),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch size for curvature estimation."),
    damping: Optional[float] = typer.Option(None, "--damping", help="Absolute damping gamma (default: relative to the mean diagonal Fisher)."),
    relative_damping: float = typer.Option(0.1, "--relative-damping", help="gamma = this x mean diag(F) when --damping is not given."),
    fit_steps: int = typer.Option(50, "--fit-steps", help="FishLeg auxiliary-loss steps before the first pruning step."),
    refit_steps: int = typer.Option(20, "--refit-steps", help="FishLeg auxiliary-loss steps between pruning sub-steps."),
    q_form: QForm = typer.Option(QForm.kron, "--q-form", help="FishLeg Q structure: kron (Kronecker) or block (block-diagonal)."),
    q_init: QInit = typer.Option(QInit.kfac, "--q-init", help="FishLeg Q initialisation: kfac (Kronecker factors of per-example gradients), diag (1/(diag F + gamma)) or identity (I/gamma)."),
    obs_update: ObsUpdate = typer.Option(ObsUpdate.row_exact, "--obs-update", help="FLS compensation: row-exact (exact group OBS per output row with the Kronecker factor) or decoupled (-Q z)."),
    block_size: int = typer.Option(50, "--block-size", help="Block size for block-diagonal curvature (FLS block form, oBERT)."),
    aux_lr: float = typer.Option(3e-3, "--aux-lr", help="Adam learning rate of the FishLeg auxiliary loss."),
    precondition: bool = typer.Option(True, "--precondition/--no-precondition", help="FishLeg preconditioned auxiliary update."),
    num_grads: int = typer.Option(256, "--num-grads", help="Gradients m for oBERT / M-FAC / iEF."),
    sparse_storage: bool = typer.Option(False, "--sparse-storage", help="Store pruned tensors as ONNX sparse_initializer where smaller."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="Fail (exit 6) if top-1 agreement with the original is below this."),
    seed: int = typer.Option(0, "--seed", help="Random seed (runs are deterministic for a given seed)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Disable the progress bar."),
) -> None:
    """Prune MODEL to the target sparsity and verify it against the original with onnxruntime."""
    from fls_compress.curvature.fishleg import FishLegConfig
    from fls_compress.pipeline import PruneOptions, prune_model
    from fls_compress.verify import summarize

    opts = PruneOptions(
        sparsity=sparsity,
        method=method,
        scope=scope.value,
        pattern=pattern,
        steps=steps,
        likelihood=likelihood.value,
        output_name=output_name,
        exclude=list(exclude),
        num_calibration=num_calibration,
        batch_size=batch_size,
        sparse_storage=sparse_storage,
        seed=seed,
        fishleg=FishLegConfig(
            form=q_form.value,
            block_size=block_size,
            damping=damping,
            relative_damping=relative_damping,
            init=q_init.value,
            fit_steps=fit_steps,
            refit_steps=refit_steps,
            lr=aux_lr,
            precondition=precondition,
            update=obs_update.value,
        ),
        num_grads=num_grads,
        damping=damping,
        min_agreement=min_agreement,
        progress=not no_progress,
    )
    result = prune_model(
        str(model),
        str(output),
        data=None if data is None else str(data),
        eval_data=None if eval_data is None else str(eval_data),
        labels=None if labels is None else str(labels),
        weights_path=None if weights is None else str(weights),
        report_path=None if report is None else str(report),
        options=opts,
    )
    sp = result["sparsity"]
    typer.echo(
        f"pruned {sp['prunable_weights']} weights with {result['method']}: sparsity {sp['achieved']:.4f} "
        f"(target {sp['target']:.4f}) in {result['timing_s']['total']:.1f}s -> {output}",
        err=True,
    )
    typer.echo(summarize(result["verification"]), err=True)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def inspect(model: Path = typer.Argument(..., help="ONNX model to inspect.")) -> None:
    """List the prunable weights and any operators that cannot be converted (JSON on stdout)."""
    from fls_compress.bridge.convert import unsupported_ops
    from fls_compress.bridge.prep import prepare_for_torch
    from fls_compress.io.onnx_model import load_onnx, model_size_bytes, prunable_initializers

    proto = load_onnx(model)
    sites = prunable_initializers(proto)
    info = {
        "path": str(model),
        "opset": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
        "inputs": [i.name for i in proto.graph.input],
        "outputs": [o.name for o in proto.graph.output],
        "size_bytes": model_size_bytes(proto),
        "prunable": [{"name": s.name, "op_type": s.op_type, "shape": list(s.shape)} for s in sites],
        "prunable_weights": sum(math.prod(s.shape) for s in sites),
        "unsupported_ops": unsupported_ops(prepare_for_torch(proto)),
        "metadata": {p.key: p.value for p in proto.metadata_props},
    }
    typer.echo(json.dumps(info, indent=2))


@app.command()
def verify(
    original: Path = typer.Argument(..., help="Reference ONNX model."),
    compressed: Path = typer.Argument(..., help="Compressed ONNX model."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Inputs to compare on (.npz / .npy / directory); synthetic if omitted."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class labels (.npy) for accuracy."),
    task: Optional[str] = typer.Option(None, "--task", help="classification, reconstruction or generic (default: from metadata)."),
    report: Optional[Path] = typer.Option(None, "--report", "-r", help="Write the JSON report here."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Compare two ONNX models with onnxruntime (output errors, agreement, accuracy, size)."""
    from fls_compress.io.calibration import load_calibration
    from fls_compress.io.onnx_model import load_onnx
    from fls_compress.pipeline import write_json_atomic
    from fls_compress.verify import summarize, verify_models

    ref = load_onnx(original)
    new = load_onnx(compressed)
    calib = load_calibration(None if data is None else str(data), ref, seed=seed, labels_path=None if labels is None else str(labels))
    result = verify_models(ref, new, calib, task=task)
    if report is not None:
        write_json_atomic(result, report)
    typer.echo(summarize(result), err=True)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def methods() -> None:
    """List the available pruning methods."""
    from fls_compress.pruning.registry import available_methods

    for name in available_methods():
        typer.echo(name)


def run() -> None:
    """Console-script entry point: map library errors to one line and an exit code."""
    try:
        app(standalone_mode=False)
    except FlsError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors and genuine bugs
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _DEBUG["on"]:
            raise
        logging.getLogger("fls_compress").debug("internal error", exc_info=True)
        typer.echo(f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); rerun with --debug for details", err=True)
        sys.exit(1)


if __name__ == "__main__":
    run()
