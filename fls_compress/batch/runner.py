"""One batch job: its JSON spec, the subprocess that runs it, its timeout, and its result row.

Every job runs in its own process (``job_command``), so a crash, an OOM kill or a timeout marks only
that job's row as failed. The child gets pinned thread counts (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
... and the spec's ``options.threads`` when the library supports it), so N concurrent jobs do not
oversubscribe the cores and a job's output bytes do not depend on how many jobs run beside it.
The spec is the library's job spec (``fls_compress.jobspec``); the child is ``fls-compress job SPEC``.
On Linux the child is killed if the process that started it dies (``PR_SET_PDEATHSIG``), so killing a
batch never leaves orphan jobs writing into the output directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .keys import file_sha256
from .summary import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS")
KILL_GRACE_S = 5.0
POLL_S = 0.05

SPEC_FILE, REPORT_FILE, LOG_FILE = "spec.json", "report.json", "job.log"

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def terminate_running(sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to every job process this process started and that still runs; returns how many."""
    with _RUNNING_LOCK:
        procs = [p for p in _RUNNING if p.returncode is None]
    for proc in procs:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
    return len(procs)


@dataclass(frozen=True)
class JobTask:
    """Everything a worker needs to run one job (plain data: picklable for process pools and Ray)."""

    name: str
    job_dir: str
    spec: dict[str, Any]
    keys: dict[str, str]
    threads: int
    timeout: float | None = None
    gpus: float = 0.0  # GPUs the job needs (a Ray resource request; the local pool does not schedule GPUs)

    @property
    def output_file(self) -> str:
        return f"{self.name}.onnx"


def build_spec(job: Any, job_dir: Path, threads: int, *, set_threads_option: bool) -> dict[str, Any]:
    """The JSON spec of ``job`` (what ``fls-compress job SPEC`` runs), with outputs inside ``job_dir``."""
    options = dict(job.options)
    options["progress"] = False  # the job's stderr goes to its log file, not a terminal
    if set_threads_option and options.get("threads") is None:
        options["threads"] = threads
    return {
        "command": job.command,
        "model": str(job.model),
        "output": str(job_dir / f"{job.name}.onnx"),
        "report": str(job_dir / REPORT_FILE),
        **{k: (None if v is None else str(v)) for k, v in job.paths().items()},
        "config": dict(job.config),
        "options": options,
    }


def job_command(spec_path: str | os.PathLike[str]) -> list[str]:
    """The subprocess command line that runs the job spec at ``spec_path`` (``fls-compress job SPEC``)."""
    return [sys.executable, "-m", "cli", "job", str(spec_path)]


def job_env(threads: int) -> dict[str, str]:
    """The child's environment: pinned thread counts, the repo on PYTHONPATH, a fixed hash seed."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONHASHSEED"] = "0"
    env.pop("RAY_ADDRESS", None)  # a job never talks to Ray itself
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    if sys.platform.startswith("linux"):
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _wait(proc: subprocess.Popen, timeout: float | None) -> tuple[bool, float]:
    """Wait for ``proc`` (killing it after ``timeout`` s); returns (timed_out, peak RSS in MiB)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out, killed_at = False, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return timed_out, usage.ru_maxrss / 1024.0
        now = time.monotonic()
        if deadline is not None and now >= deadline and not timed_out:
            timed_out, killed_at = True, now
            proc.send_signal(signal.SIGTERM)
        elif killed_at is not None and now - killed_at > KILL_GRACE_S:
            proc.kill()
            killed_at = float("inf")
        time.sleep(POLL_S)


def _error_line(log_path: Path) -> str | None:
    """The last ``error: ...`` line the CLI printed, else the last non-empty line of the log."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    return lines[-1][:300] if lines else None


def key_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers a person compares across a zoo, from a job's JSON report."""
    out: dict[str, Any] = {}
    sp = report.get("sparsity")
    if isinstance(sp, dict):
        out["sparsity"] = sp.get("achieved")
    ver = report.get("verification") or {}
    outputs = ver.get("outputs") or {}
    for key, pick in (("relative_l2_error", max), ("cosine_similarity", min), ("top1_agreement", min),
                      ("accuracy_original", min), ("accuracy_compressed", min)):
        values = [o[key] for o in outputs.values() if isinstance(o, dict) and isinstance(o.get(key), (int, float))]
        if values:
            out[key] = pick(values)
    sizes = ver.get("model_size_bytes") or {}
    if sizes.get("ratio") is not None:
        out["size_ratio"] = sizes["ratio"]
    latency = report.get("latency") or {}
    for timed in latency.get("batches") or ():  # speed-up at batch 1 and at the evaluation batch
        key = "speedup_batch1" if timed.get("batch") == 1 else "speedup_eval_batch"
        out[key] = timed.get("speedup")
    if latency.get("verdict"):
        out["latency_verdict"] = latency["verdict"]
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_job(task: JobTask) -> dict[str, Any]:
    """Run one job in a subprocess and return its result row (never raises for a job failure)."""
    job_dir = Path(task.job_dir)
    if job_dir.exists():
        shutil.rmtree(job_dir)  # a previous, unfinished or failed attempt
    job_dir.mkdir(parents=True)
    spec_path = job_dir / SPEC_FILE
    write_json_atomic(task.spec, spec_path)
    log_path = job_dir / LOG_FILE
    row: dict[str, Any] = {"name": task.name, "command": task.spec["command"], "model": task.spec["model"],
                           "method": task.spec["config"].get("method"), **task.keys, "threads": task.threads,
                           "started": _now()}
    t0 = time.perf_counter()
    try:
        cmd = job_command(spec_path)
        with open(log_path, "wb") as log_fh:
            log_fh.write(("$ " + " ".join(cmd) + "\n").encode())
            log_fh.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT,
                                    cwd=str(REPO_ROOT), env=job_env(task.threads), preexec_fn=_die_with_parent)
            with _RUNNING_LOCK:
                _RUNNING.add(proc)
            try:
                timed_out, peak_rss = _wait(proc, task.timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc)
    except OSError as exc:
        row.update(status="failed", exit_code=None, error=f"cannot start the job: {exc}", wall_s=0.0)
        return row
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {}
    try:
        report = json.loads((job_dir / REPORT_FILE).read_text())
    except (OSError, ValueError):
        pass
    code = proc.returncode
    row.update(exit_code=code, wall_s=round(wall, 3), peak_rss_mib=round(peak_rss, 1), finished=_now())
    output = job_dir / task.output_file
    if timed_out:
        row.update(status="timeout", error=f"timed out after {task.timeout:g}s")
    elif code < 0:
        row.update(status="crashed", error=f"killed by {signal.Signals(-code).name}"
                   + (" (out of memory?)" if -code == signal.SIGKILL else ""))
    elif code != 0:
        row.update(status="failed", error=report.get("error") or _error_line(log_path) or f"exit code {code}")
    elif not output.is_file():
        row.update(status="failed", error="the job exited 0 but wrote no model")
    else:
        row.update(status="ok", error=None)
    if report:
        row["metrics"] = key_metrics(report)
        timing = report.get("timing_s") or report.get("timings") or {}
        if isinstance(timing, dict):
            row["job_timing_s"] = {k: round(v, 3) for k, v in timing.items() if isinstance(v, (int, float))}
    row["input_bytes"] = os.path.getsize(task.spec["model"]) if os.path.isfile(task.spec["model"]) else None
    if row["status"] == "ok":
        row["output"] = f"{task.name}/{task.output_file}"
        row["output_bytes"] = output.stat().st_size
        row["output_sha256"] = file_sha256(output)
    return row
