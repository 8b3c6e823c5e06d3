"""The JSON report every command returns: strict JSON, written atomically, also on failure.

Strict JSON: ``NaN``/``Infinity`` are not JSON (strict parsers reject them), so non-finite numbers are
written as ``null`` and the dotted path of each is listed under ``non_finite`` (e.g.
``verification.outputs.y.relative_l2_error``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .errors import FlsError, Interrupted, OutputError, first_line
from .io.paths import default_file_mode


class Report(dict):
    """A compression/verification report: a JSON-ready dict with a few typed accessors."""

    @property
    def status(self) -> str:
        return str(self.get("status", "unknown"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> str:
        return json.dumps(strict_json(self), indent=2, allow_nan=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def strict_json(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with non-finite floats replaced by ``None`` and their paths in ``non_finite``."""
    found: list[str] = []

    def walk(obj: Any, path: str) -> Any:
        obj = _plain(obj)
        if isinstance(obj, float) and not math.isfinite(obj):
            found.append(path)
            return None
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items() if k != "non_finite"}
        if isinstance(obj, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return obj

    out = walk(dict(data), "")
    if found:
        out["non_finite"] = found
    return out


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write strict JSON to ``path`` through a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write report {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(strict_json(data), fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.chmod(tmp, default_file_mode())  # mkstemp files are 0o600
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write report {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_report(command: str) -> Report:
    return Report(tool={"name": "fls-compress", "version": __version__}, command=command, status="running")


def mark_failed(report: Report, exc: BaseException) -> Report:
    """Turn a partial report into a failure report for ``exc`` (keeps whatever was measured)."""
    line = first_line(exc)
    report["status"] = "failed"
    report["error"] = line
    report["error_class"] = type(exc).__name__
    report["exit_code"] = exit_code_of(exc)
    return report


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, (FlsError, Interrupted)):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit) and isinstance(exc.code, int):
        return exc.code
    return 1


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Every warning logged under ``fls_compress`` during the block, for the report's ``warnings``."""
    handler = _Collect()
    logger = logging.getLogger("fls_compress")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
