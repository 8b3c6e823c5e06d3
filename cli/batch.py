"""``fls-compress batch``: compress every model of a manifest (see docs/batch.md)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class ExecutorKind(str, Enum):
    local = "local"
    ray = "ray"


def batch(
    manifest: Path = typer.Argument(..., help="Batch manifest (YAML or JSON; schema in docs/batch.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: one sub-directory per job, results.jsonl, summary.md/csv."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Jobs run at the same time."),
    executor: ExecutorKind = typer.Option(ExecutorKind.local, "--executor", help="local: a process per job on this machine; ray: one Ray task per job."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address to join (default: start a local Ray instance)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Skip jobs whose inputs, data, config and tool version match a successful row."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop the batch at the first failed job."),
    job_timeout: Optional[float] = typer.Option(None, "--job-timeout", min=0.001, help="Kill a job after this many seconds (its row is marked timeout)."),
    threads_per_job: Optional[int] = typer.Option(None, "--threads-per-job", min=1, help="Threads of each job (default: cpus // workers)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Compress every job of MANIFEST into OUT; exit 8 when a job failed (see summary.md)."""
    from fls_compress.batch import ManifestError, run_batch

    try:
        result = run_batch(manifest, out, workers=workers, executor=executor.value, address=address, resume=resume,
                           fail_fast=fail_fast, job_timeout=job_timeout, threads_per_job=threads_per_job,
                           progress=progress)
    except ManifestError as exc:
        for issue in exc.issues:
            typer.echo(f"error: {issue}", err=True)
        raise typer.Exit(exc.exit_code) from None
    meta = result.meta
    typer.echo(f"{meta['ok']} ok, {meta['failed']} failed ({meta['reused']} reused) in {meta['wall_s']:.1f}s "
               f"-> {out}/summary.md", err=True)
    typer.echo(json.dumps({**meta, "results": str(out / "results.jsonl")}, indent=2))
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add the ``batch`` command to the ``fls-compress`` Typer app."""
    app.command(name="batch")(batch)
