"""Batch manifests: the schema, up-front validation with line numbers, and expansion into jobs.

A manifest (YAML or JSON) lists compression jobs; ``defaults`` apply to every job and a job's own keys
override them (``config`` and ``options`` are merged key by key). ``models:`` (a glob) expands one entry
into one job per matching file, and ``{stem}`` in a job's string fields is replaced by the model file's
stem. Relative paths resolve against the manifest's directory. The full schema is in ``docs/batch.md``.

Every problem found is collected (with its ``file:line`` and ``jobs[i]`` entry) before anything runs,
and reported together in one :class:`ManifestError`.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError

log = logging.getLogger(__name__)

COMMANDS = ("prune", "quantize")
PATH_KEYS = ("data", "eval_data", "labels", "weights")
JOB_KEYS = ("name", "model", "models", "command", *PATH_KEYS, "config", "options", "timeout", "num_gpus")
DEFAULT_KEYS = tuple(k for k in JOB_KEYS if k not in ("name", "model", "models"))
TOP_KEYS = ("version", "defaults", "jobs")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(InvalidOptionError):
    """The manifest is unreadable or invalid; ``issues`` holds every problem as ``where: message``."""

    def __init__(self, path: Path, issues: list[str]):
        self.issues = list(issues)
        n = len(self.issues)
        super().__init__(f"{path}: {n} error{'s' if n != 1 else ''} in the batch manifest: {self.issues[0]}")


@dataclass(frozen=True)
class Job:
    """One expanded, validated job of a batch (absolute paths; ``config``/``options`` as dicts)."""

    name: str
    command: str
    model: Path
    config: dict[str, Any]
    options: dict[str, Any]
    data: Path | None = None
    eval_data: Path | None = None
    labels: Path | None = None
    weights: Path | None = None
    timeout: float | None = None
    num_gpus: float = 0.0
    source: str = ""  # where it came from, e.g. "zoo.yaml:12 jobs[3]"

    def paths(self) -> dict[str, Path | None]:
        return {k: getattr(self, k) for k in PATH_KEYS}


@dataclass
class Manifest:
    path: Path
    jobs: list[Job]
    validated_configs: bool = True  # False when the library config classes were not importable
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- loading
def _line_map(text: str) -> dict[tuple, int]:
    """(path tuple) -> 1-based line of every mapping value / sequence item, from the YAML node tree."""
    import yaml

    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                k = key.value if isinstance(key, yaml.ScalarNode) else str(key)
                walk(value, path + (k,))
                lines[path + (k,)] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _duplicate_keys(text: str) -> list[tuple[str, int]]:
    """Keys given twice in one mapping (YAML silently keeps the last; we refuse)."""
    import yaml

    found: list[tuple[str, int]] = []

    def walk(node: Any) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                k = getattr(key, "value", None)
                if isinstance(k, str):
                    if k in seen:
                        found.append((k, key.start_mark.line + 1))
                    seen.add(k)
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return found
    walk(root)
    return found


def read_manifest_data(path: Path) -> tuple[Any, dict[tuple, int], list[str]]:
    """Parse a manifest file: (data, line map, issues). JSON for ``.json``, YAML otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(path, [f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"{path}: cannot read: {exc}"]) from None
    import yaml

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, [f"{path.name}:{exc.lineno}: invalid JSON: {exc.msg}"]) from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path.name}:{mark.line + 1}" if mark is not None else path.name
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ManifestError(path, [f"{where}: invalid YAML: {problem}"]) from None
    issues = [f"{path.name}:{line}: key {k!r} given twice" for k, line in _duplicate_keys(text)]
    return data, _line_map(text), issues


# ---------------------------------------------------------------------------------------------- validation
class _Checker:
    """Collects issues with their location."""

    def __init__(self, path: Path, lines: dict[tuple, int]):
        self.path, self.lines, self.issues = path, lines, []

    def where(self, loc: tuple) -> str:
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        entry = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        head = f"{self.path.name}:{line}" if line is not None else self.path.name
        return f"{head} {entry}" if entry else head

    def add(self, loc: tuple, message: str) -> None:
        self.issues.append(f"{self.where(loc)}: {message}")


def _library_validators():
    """``(config_from_dict, RunOptions)`` from the library, or ``None`` when they are not available."""
    try:
        from ..configs import RunOptions, config_from_dict
    except ImportError:
        return None
    return config_from_dict, RunOptions


def _check_entry(chk: _Checker, loc: tuple, entry: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        chk.add(loc, f"must be a mapping, got {type(entry).__name__}")
        return {}
    for key in sorted(set(entry) - set(allowed), key=str):
        chk.add(loc + (key,), f"unknown key {key!r}; valid keys: {', '.join(allowed)}")
    out = {k: v for k, v in entry.items() if k in allowed}
    for key in ("config", "options"):
        if key in out and out[key] is not None and not isinstance(out[key], dict):
            chk.add(loc + (key,), f"{key} must be a mapping, got {type(out[key]).__name__}")
            out.pop(key)
    for key in ("name", "model", "models", "command", *PATH_KEYS):
        if out.get(key) is not None and not isinstance(out[key], str):
            chk.add(loc + (key,), f"{key} must be a string, got {out[key]!r}")
            out.pop(key)
    for key in ("timeout", "num_gpus"):
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "timeout" and v == 0)):
            chk.add(loc + (key,), f"{key} must be a {'positive' if key == 'timeout' else 'non-negative'} number, got {v!r}")
            out.pop(key)
    return out


def _merge(defaults: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **entry}
    for key in ("config", "options"):
        merged[key] = {**(defaults.get(key) or {}), **(entry.get(key) or {})}
    return merged


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _subst(value: Any, stem: str) -> Any:
    return value.replace("{stem}", stem) if isinstance(value, str) else value


def load_manifest(path: str | Path) -> Manifest:
    """Read, validate and expand a manifest; raises :class:`ManifestError` listing every problem."""
    path = Path(path).absolute()
    data, lines, issues = read_manifest_data(path)
    chk = _Checker(path, lines)
    chk.issues.extend(issues)
    base = path.parent
    if not isinstance(data, dict):
        raise ManifestError(path, [f"{path.name}: the manifest must be a mapping with a 'jobs' list"])
    for key in sorted(set(data) - set(TOP_KEYS), key=str):
        chk.add((key,), f"unknown top-level key {key!r}; valid keys: {', '.join(TOP_KEYS)}")
    if data.get("version", 1) != 1:
        chk.add(("version",), f"unsupported manifest version {data.get('version')!r} (this tool reads version 1)")
    defaults = _check_entry(chk, ("defaults",), data.get("defaults") or {}, DEFAULT_KEYS)
    raw_jobs = data.get("jobs")
    if not isinstance(raw_jobs, list) or not raw_jobs:
        chk.add(("jobs",), "'jobs' must be a non-empty list")
        raw_jobs = []
    validators = _library_validators()
    warnings: list[str] = []
    if validators is None:
        msg = "fls_compress.configs is not available: job configs are checked for structure only, not validated"
        log.warning(msg)
        warnings.append(msg)

    jobs: list[Job] = []
    for i, raw in enumerate(raw_jobs):
        loc = ("jobs", i)
        entry = _check_entry(chk, loc, raw, JOB_KEYS)
        if not entry and not isinstance(raw, dict):
            continue
        spec = _merge(defaults, entry)
        if ("model" in entry) == ("models" in entry):
            chk.add(loc, "give exactly one of 'model' (a file) or 'models' (a glob)")
            continue
        if "model" in entry:
            models = [_resolve(base, entry["model"])]
        else:
            pattern = str(_resolve(base, entry["models"]))
            models = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
            if not models:
                chk.add(loc + ("models",), f"glob {entry['models']!r} matches no file")
                continue
        command = spec.get("command", "prune")
        if command not in COMMANDS:
            chk.add(loc + ("command",) if "command" in entry else ("defaults", "command"),
                    f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
            continue
        config, options = dict(spec["config"]), dict(spec["options"])
        if validators is not None:
            config_from_dict, run_options = validators
            try:
                config = config_from_dict(config, command=command).to_dict()
            except InvalidOptionError as exc:
                chk.add(loc + ("config",), str(exc).splitlines()[0])
            try:
                options = run_options.from_dict(options).to_dict()
            except InvalidOptionError as exc:
                chk.add(loc + ("options",), str(exc).splitlines()[0])
        for model in models:
            stem = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.stem
            name = _subst(spec.get("name") or stem, stem)
            if not model.is_file():
                chk.add(loc + ("model",), f"model file not found: {model}")
            if not NAME_RE.match(name):
                chk.add(loc + ("name",), f"job name {name!r} must be letters, digits, '.', '_' or '-' (a directory name)")
            paths: dict[str, Path | None] = {}
            for key in PATH_KEYS:
                value = _subst(spec.get(key), stem)
                paths[key] = None if value is None else _resolve(base, value)
                if paths[key] is not None and not paths[key].exists():
                    where = loc + (key,) if key in entry else ("defaults", key)
                    chk.add(where, f"{key} not found: {paths[key]}" + (f" (for model {model.name})" if "models" in entry else ""))
            jobs.append(Job(
                name=name, command=command, model=model, config=config, options=options,
                timeout=None if spec.get("timeout") is None else float(spec["timeout"]),
                num_gpus=float(spec.get("num_gpus") or 0.0), source=chk.where(loc), **paths,
            ))
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.name in seen:
            chk.issues.append(f"{job.source}: job name {job.name!r} is also used by {seen[job.name].source}; "
                              "give each job a distinct 'name' (templates may use {stem})")
        seen.setdefault(job.name, job)
    if chk.issues:
        raise ManifestError(path, chk.issues)
    return Manifest(path=path, jobs=jobs, validated_configs=validators is not None, warnings=warnings)
