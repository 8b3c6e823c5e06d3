"""Job specs: one compression job as JSON (what ``fls-compress job`` and ``batch`` run).

::

    {"command": "prune",
     "model": "model.onnx", "output": "out/model.onnx", "report": "out/report.json",
     "data": "calib.npz", "eval_data": null, "labels": null, "weights": null,
     "config": {"method": "fls", "sparsity": 0.9},        # MethodConfig.to_dict()
     "options": {"seed": 0, "progress": false}}            # RunOptions.to_dict()

Relative paths resolve against the spec file's directory. Unknown keys are refused. The same spec gives
byte-identical outputs on every run with the same thread count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .configs import RunOptions, config_from_dict
from .errors import InvalidOptionError
from .report import Report

SPEC_KEYS = ("command", "model", "output", "report", "data", "eval_data", "labels", "weights", "config", "options")
PATH_KEYS = ("model", "output", "report", "data", "eval_data", "labels", "weights")


def make_spec(command: str, model: str, output: str, config: Any, *, options: RunOptions | None = None,
              **paths: str | None) -> dict[str, Any]:
    """A spec dict for ``config`` (the inverse of :func:`run_spec`)."""
    spec = {"command": command, "model": str(model), "output": str(output), "config": config.to_dict(),
            "options": (options or RunOptions()).to_dict()}
    spec.update({k: None if v is None else str(v) for k, v in paths.items()})
    return spec


def run_spec(spec: dict[str, Any], base_dir: str | os.PathLike[str] = ".") -> Report:
    """Validate and run one spec; returns the report (raises like :func:`fls_compress.compress`)."""
    if not isinstance(spec, dict):
        raise InvalidOptionError("a job spec must be a JSON object")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise InvalidOptionError(f"unknown job spec key(s): {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}")
    for key in ("command", "model", "output", "config"):
        if spec.get(key) is None:
            raise InvalidOptionError(f"job spec needs {key!r}")
    command = spec["command"]
    if command not in ("prune", "quantize"):
        raise InvalidOptionError(f"job spec command must be prune or quantize, got {command!r}")
    config = config_from_dict(spec["config"], command=command)
    options = RunOptions.from_dict(spec.get("options") or {})
    base = Path(base_dir)
    paths = {k: (None if spec.get(k) is None else str(base / spec[k])) for k in PATH_KEYS}
    from .engine import compress

    return compress(paths["model"], config, paths["data"], output=paths["output"], eval_data=paths["eval_data"],
                    labels=paths["labels"], weights=paths["weights"], report=paths["report"], options=options)


def run_spec_file(path: str | os.PathLike[str]) -> Report:
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidOptionError(f"job spec not found: {p}") from None
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(f"cannot read job spec {p}: {exc}") from None
    return run_spec(spec, base_dir=p.parent)
