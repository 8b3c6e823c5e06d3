"""Run a batch: manifest in, one job directory and one result row per job out, resumable.

The result files are rewritten atomically after every finished job, so a batch killed at any moment
keeps every finished job (its directory and its row); a re-run with ``resume`` skips the jobs whose
resume key (:mod:`fls_compress.batch.keys`) matches a successful row and runs the rest.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FlsError
from .executors import make_executor
from .keys import job_keys, reusable
from .manifest import Manifest, load_manifest
from .progress import BatchProgress
from .runner import JobTask, build_spec
from .summary import RESULTS_FILE, read_results, write_json_atomic, write_outputs

log = logging.getLogger(__name__)

BATCH_FILE = "batch.json"
JOBS_FAILED_EXIT = 8
"""Exit code of ``fls-compress batch`` when the batch ran but at least one job failed."""


class BatchInterrupted(FlsError):
    """SIGINT / SIGTERM stopped the batch; finished jobs and their rows were kept."""

    def __init__(self, signum: int):
        super().__init__(f"batch interrupted by {signal.Signals(signum).name}; finished jobs were kept, "
                         "re-run the same command to complete it")
        self.exit_code = 128 + int(signum)


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") != "ok"]

    @property
    def exit_code(self) -> int:
        return JOBS_FAILED_EXIT if self.failed else 0


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_option_supported() -> bool:
    """Whether job specs carry ``options.threads`` (the library's RunOptions has the field)."""
    try:
        from ..configs import RunOptions
    except ImportError:
        return False
    return "threads" in getattr(RunOptions, "__dataclass_fields__", {})


def plan(manifest: Manifest, out_dir: Path, threads: int, *, resume: bool,
         default_timeout: float | None) -> tuple[list[JobTask], dict[str, dict[str, Any]]]:
    """(tasks to run, reused rows by name) for the manifest's jobs."""
    previous = read_results(out_dir / RESULTS_FILE) if resume else {}
    with_threads = threads_option_supported()
    tasks: list[JobTask] = []
    reused: dict[str, dict[str, Any]] = {}
    for job in manifest.jobs:
        job_dir = out_dir / job.name
        spec = build_spec(job, job_dir, threads, set_threads_option=with_threads)
        keys = job_keys(job, spec)
        if resume and reusable(previous.get(job.name), keys, out_dir):
            reused[job.name] = previous[job.name]
            continue
        job_threads = int(spec["options"].get("threads") or threads)  # a job's own options.threads wins
        tasks.append(JobTask(name=job.name, job_dir=str(job_dir), spec=spec, keys=keys, threads=job_threads,
                             timeout=job.timeout if job.timeout is not None else default_timeout, gpus=job.num_gpus))
    return tasks, reused


def _placeholder(task: JobTask, status: str, error: str | None) -> dict[str, Any]:
    return {"name": task.name, "command": task.spec["command"], "model": task.spec["model"],
            "method": task.spec["config"].get("method"), **task.keys, "threads": task.threads,
            "status": status, "exit_code": None, "error": error}


def run_batch(manifest_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, workers: int = 1,
              executor: str = "local", address: str | None = None, resume: bool = True, fail_fast: bool = False,
              job_timeout: float | None = None, threads_per_job: int | None = None,
              progress: bool = True) -> BatchResult:
    """Run every job of the manifest; returns the rows (failures first) and the batch metadata.

    ``threads_per_job`` defaults to ``max(1, cpus // workers)``; it is part of each job's resume key
    when the library honours ``options.threads`` (outputs are byte-identical only for one thread count).
    """
    if workers < 1:
        from ..errors import InvalidOptionError

        raise InvalidOptionError(f"--workers must be >= 1, got {workers}")
    manifest = load_manifest(manifest_path)
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_job or max(1, available_cpus() // workers)
    tasks, reused = plan(manifest, out, threads, resume=resume, default_timeout=job_timeout)
    rows: dict[str, dict[str, Any]] = dict(reused)
    for task in tasks:
        rows[task.name] = _placeholder(task, "pending", None)
    meta: dict[str, Any] = {
        "manifest": str(manifest.path), "executor": executor, "workers": workers, "threads_per_job": threads,
        "tool_version": __version__, "jobs": len(manifest.jobs), "reused": len(reused), "to_run": len(tasks),
        "validated_configs": manifest.validated_configs, "warnings": list(manifest.warnings),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_outputs(out, rows.values(), meta)
    for name in reused:
        log.info("job %s: unchanged since a successful run, reused", name)
    t0 = time.perf_counter()
    interrupted: int | None = None
    old_handlers: dict[int, Any] = {}
    in_main = threading.current_thread() is threading.main_thread()

    def on_term(signum: int, frame: Any) -> None:
        raise BatchInterrupted(signum)

    with BatchProgress(len(manifest.jobs), enabled=progress, done=len(reused)) as bar:
        pool = make_executor(executor, workers, threads, address)
        if in_main:
            old_handlers = {sig: signal.signal(sig, on_term) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopped = False
            for row in pool.run(tasks, tick=lambda: bar.update(pool.running())):
                rows[row["name"]] = row
                write_outputs(out, rows.values(), meta)
                bar.update(pool.running(), row)
                bar.echo(f"{row['status']:>8}  {row['name']}  ({row.get('wall_s', 0.0):.1f}s)"
                         + (f"  {row['error']}" if row.get("error") else ""))
                if fail_fast and row["status"] != "ok":
                    stopped = True
                    break
            if stopped:
                for task in pool.in_flight.values():
                    rows[task.name] = _placeholder(task, "cancelled", "not finished: --fail-fast stopped the batch")
                for name, row in rows.items():
                    if row["status"] == "pending":
                        row.update(status="skipped", error="not run: --fail-fast stopped the batch")
                pool.cancel()
        except (KeyboardInterrupt, BatchInterrupted) as exc:
            interrupted = exc.exit_code - 128 if isinstance(exc, BatchInterrupted) else signal.SIGINT
            pool.cancel()
            for task in pool.in_flight.values():
                rows[task.name] = _placeholder(task, "interrupted", f"batch interrupted by {signal.Signals(interrupted).name}")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            pool.close()
    meta["wall_s"] = round(time.perf_counter() - t0, 3)
    meta["parent_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    result = BatchResult(rows=[rows[j.name] for j in manifest.jobs], meta=meta)
    meta.update(ok=len(result.rows) - len(result.failed), failed=len(result.failed))
    write_outputs(out, result.rows, meta)
    write_json_atomic(meta, out / BATCH_FILE)
    if interrupted is not None:
        raise BatchInterrupted(interrupted)
    return result
