"""Batch compression of a model zoo: a manifest of jobs in, one verified artifact and one result row per job.

* :mod:`.manifest` - the manifest schema, up-front validation (with line numbers), glob/default expansion.
* :mod:`.runner` - a job's JSON spec, the subprocess that runs it (timeout, pinned threads), its result row.
* :mod:`.executors` - the local process pool and the Ray executor.
* :mod:`.keys` - resume keys (input / data SHA-256, config hash, tool version).
* :mod:`.summary` - ``results.jsonl``, ``summary.md`` and ``summary.csv``, written atomically.
* :mod:`.driver` - :func:`run_batch`, tying them together.
"""

from .driver import JOBS_FAILED_EXIT, BatchInterrupted, BatchResult, run_batch
from .manifest import Job, Manifest, ManifestError, load_manifest
from .runner import job_command

__all__ = ["JOBS_FAILED_EXIT", "BatchInterrupted", "BatchResult", "Job", "Manifest", "ManifestError", "job_command",
           "load_manifest", "run_batch"]
