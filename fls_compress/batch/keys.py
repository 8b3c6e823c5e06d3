"""Resume keys: what makes a finished job's result reusable.

A job is skipped on a re-run when its key - the SHA-256 of the input model, the SHA-256 of its data
files, the hash of its (command, config, options) and the tool version - equals the key stored in a
successful result row, and the compressed model recorded in that row is still there, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__

KEY_FIELDS = ("input_sha256", "data_sha256", "config_hash", "tool_version")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_sha256(paths: dict[str, Path | None]) -> str:
    """One digest over every data file of a job (role and content; a directory hashes its files in order)."""
    h = hashlib.sha256()
    for role in sorted(paths):
        path = paths[role]
        h.update(f"{role}\0".encode())
        if path is None:
            h.update(b"-\0")
            continue
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            rel = f.relative_to(path).as_posix() if Path(path).is_dir() else ""
            h.update(f"{rel}\0{file_sha256(f)}\0".encode())
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)


def config_hash(command: str, config: dict[str, Any], options: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of what the job computes (``progress`` does not change outputs)."""
    opts = {k: v for k, v in options.items() if k != "progress"}
    return hashlib.sha256(canonical_json({"command": command, "config": config, "options": opts}).encode()).hexdigest()


def job_keys(job: Any, spec: dict[str, Any]) -> dict[str, str]:
    """The resume key of ``job`` given its spec (the options actually passed, e.g. pinned threads)."""
    return {
        "input_sha256": file_sha256(job.model),
        "data_sha256": data_sha256(job.paths()),
        "config_hash": config_hash(job.command, spec["config"], spec["options"]),
        "tool_version": __version__,
    }


def reusable(row: dict[str, Any] | None, keys: dict[str, str], out_dir: Path) -> bool:
    """True when ``row`` is a successful result for the same key and its model is intact on disk."""
    if not row or row.get("status") != "ok" or any(row.get(k) != keys[k] for k in KEY_FIELDS):
        return False
    output = row.get("output")
    if not output or not (out_dir / output).is_file():
        return False
    return file_sha256(out_dir / output) == row.get("output_sha256")
