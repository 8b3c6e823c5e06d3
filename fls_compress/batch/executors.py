"""Where batch jobs run: a local pool (``concurrent.futures``, the default) or Ray tasks.

Both keep at most ``workers`` jobs in flight and hand back result rows as jobs finish, in completion
order. Each job is a subprocess started by :func:`~fls_compress.batch.runner.run_job`, so the bytes a
job writes do not depend on the executor; only the scheduling differs.

* :class:`LocalExecutor`: a ``ThreadPoolExecutor`` whose threads each supervise one job process
  (threads suffice: the work happens in the child processes, and the parent stays small).
* :class:`RayExecutor`: one Ray task per job with ``num_cpus`` = the job's thread count and the job's
  ``num_gpus``; ``max_retries`` re-runs a task whose worker died (a system failure, not a job error);
  results stream back with ``ray.wait``. ``address`` joins an existing cluster (the output directory
  must then be on a filesystem every node sees, and fls-compress installed on them); otherwise a local
  instance is started with ``ray.init(num_cpus=..., include_dashboard=False)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from .runner import REPO_ROOT, JobTask, run_job, terminate_running

log = logging.getLogger(__name__)

WAIT_S = 0.5  # how often the driver wakes up to refresh progress while jobs run


def _internal_failure(task: JobTask, exc: BaseException, status: str = "crashed") -> dict[str, Any]:
    return {"name": task.name, "command": task.spec["command"], "model": task.spec["model"],
            "method": task.spec["config"].get("method"), **task.keys, "threads": task.threads, "status": status,
            "exit_code": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


class Executor:
    """Runs tasks with at most ``workers`` in flight; subclasses provide submit / wait / result / cancel."""

    name = "base"

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.in_flight: dict[Any, JobTask] = {}

    # subclass hooks ---------------------------------------------------------------------------
    def _submit(self, task: JobTask) -> Any: ...
    def _wait(self, handles: list[Any]) -> list[Any]: ...
    def _result(self, handle: Any, task: JobTask) -> dict[str, Any]: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...

    def run(self, tasks: list[JobTask], tick: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Yield one row per task as tasks finish; ``tick`` is called while waiting (progress refresh)."""
        queue = list(tasks)
        while queue or self.in_flight:
            while queue and len(self.in_flight) < self.workers:
                task = queue.pop(0)
                self.in_flight[self._submit(task)] = task
            for handle in self._wait(list(self.in_flight)):
                task = self.in_flight.pop(handle)
                yield self._result(handle, task)
            if tick is not None:
                tick()

    def running(self) -> list[str]:
        return [t.name for t in self.in_flight.values()]

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            self.cancel()
        self.close()


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int):
        super().__init__(workers)
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fls-batch")

    def _submit(self, task: JobTask) -> cf.Future:
        return self.pool.submit(run_job, task)

    def _wait(self, handles: list[cf.Future]) -> list[cf.Future]:
        done, _ = cf.wait(handles, timeout=WAIT_S, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]  # keep submission order among simultaneous finishes

    def _result(self, handle: cf.Future, task: JobTask) -> dict[str, Any]:
        try:
            return handle.result()
        except Exception as exc:  # a bug in the supervisor thread, not in the job
            log.warning("job %s: supervisor failed: %s", task.name, exc)
            return _internal_failure(task, exc)

    def cancel(self) -> None:
        for handle in self.in_flight:
            handle.cancel()
        terminate_running()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, workers: int, threads: int, *, address: str | None = None, max_retries: int = 2):
        super().__init__(workers)
        try:
            import ray
        except ImportError as exc:
            from ..errors import InvalidOptionError

            raise InvalidOptionError("--executor ray needs Ray: pip install 'fls-compress[ray]'") from exc
        self.ray = ray
        self.threads, self.max_retries = threads, max_retries
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # workers of a local instance inherit this environment: make the package importable
                path = os.environ.get("PYTHONPATH", "")
                if str(REPO_ROOT) not in path.split(os.pathsep):
                    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
                ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False)
            self.started = True
        self.remote = ray.remote(run_job)
        self.cluster_cpus = float(ray.cluster_resources().get("CPU", workers * threads))

    def _submit(self, task: JobTask) -> Any:
        # a request larger than the cluster would never be scheduled: ask for at most all of its CPUs
        return self.remote.options(num_cpus=min(float(task.threads), self.cluster_cpus), num_gpus=task.gpus,
                                   max_retries=self.max_retries, retry_exceptions=False,
                                   name=f"fls-job:{task.name}").remote(task)

    def _wait(self, handles: list[Any]) -> list[Any]:
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=WAIT_S)
        return ready

    def _result(self, handle: Any, task: JobTask) -> dict[str, Any]:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as exc:  # worker died max_retries + 1 times, or task cancelled
            log.warning("job %s: Ray task failed: %s", task.name, str(exc).splitlines()[0] if str(exc) else exc)
            return _internal_failure(task, exc)

    def cancel(self) -> None:
        for handle in self.in_flight:
            try:
                self.ray.cancel(handle, force=True)  # kills the worker; its job process dies with it
            except Exception as exc:  # already finished
                log.debug("cancel %s: %s", self.in_flight[handle].name, exc)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, workers: int, threads: int, address: str | None = None) -> Executor:
    if kind == "local":
        if address:
            from ..errors import InvalidOptionError

            raise InvalidOptionError("--address is only used with --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, threads, address=address)
    from ..errors import InvalidOptionError

    raise InvalidOptionError(f"--executor must be local or ray, got {kind!r}")
