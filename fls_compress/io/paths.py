"""One path guard for every command: outputs never touch inputs, and never each other.

A run reads some files (the model, its external-data files, calibration/eval data, labels, weights) and
writes others (the compressed model, its external-data file, the report). :func:`check_paths` refuses,
before any work,

* with :class:`~fls_compress.errors.InvalidOptionError` (exit 2) an output that resolves, by
  ``realpath`` or by inode (hard links, symlinks), to an input or to another output;
* with :class:`~fls_compress.errors.OutputError` (exit 7) an output path that is a directory, whose
  parent is not a directory, or whose directory cannot be written (probed by creating and removing a
  temp file: ``os.access`` is wrong for root, read-only mounts and ACLs).

:func:`report_path_ok` says whether a failure report may still be written when another path is bad.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..errors import FlsError, InvalidOptionError, OutputError

PathLike = str | os.PathLike[str]


def external_data_files(model_path: PathLike) -> list[Path]:
    """The external-data files an ONNX file references (read without loading the tensors)."""
    path = Path(model_path)
    if not path.is_file():
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable models are reported by the loader, not here
        return []
    found: list[Path] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc:
                p = path.parent / loc
                if p not in found:
                    found.append(p)
    return found


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(g)


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return real, (st.st_dev, st.st_ino)
    except OSError:
        return real, None


def _same(a: Path, b: Path) -> bool:
    ra, ia = _identity(a)
    rb, ib = _identity(b)
    return ra == rb or (ia is not None and ia == ib)


def _labelled(inputs: dict[str, PathLike | None], outputs: dict[str, PathLike | None]) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    ins: list[tuple[str, Path]] = []
    for label, p in inputs.items():
        if p is None:
            continue
        path = Path(p)
        ins.append((label, path))
        if path.is_dir():
            ins.extend((label, child) for child in sorted(path.iterdir()) if child.is_file())
        if label == "model" or str(path).endswith(".onnx"):
            ins.extend((f"{label} external data", ext) for ext in external_data_files(path))
    outs: list[tuple[str, Path]] = []
    for label, p in outputs.items():
        if p is None:
            continue
        path = Path(p)
        outs.append((label, path))
        if path.suffix == ".onnx":
            outs.append((f"{label} external data", path.parent / f"{path.name}.data"))
    return ins, outs


def _collision(ins: list[tuple[str, Path]], outs: list[tuple[str, Path]], only: str | None = None) -> str | None:
    """The first output that is an input or another output (``only``: check that output label alone)."""
    for label, path in outs:
        if only is not None and not label.startswith(only):
            continue
        for in_label, in_path in ins:
            if _same(path, in_path):
                return f"{label} {path} is the {in_label} file {in_path}; it would be overwritten"
    for i, (la, pa) in enumerate(outs):
        for lb, pb in outs[i + 1 :]:
            if only is not None and not (la.startswith(only) or lb.startswith(only)):
                continue
            if _same(pa, pb):
                return f"{la} and {lb} are the same file {pa}"
    return None


def check_paths(inputs: dict[str, PathLike | None], outputs: dict[str, PathLike | None]) -> None:
    """Validate output paths against inputs and each other (labels name the options in messages).

    ``inputs`` maps a label (``"model"``, ``"--data"``...) to a path; directories count with every
    file in them. ``outputs`` maps a label (``"-o"``, ``"--report"``) to a path; for ONNX outputs the
    ``<name>.data`` external-data file is guarded too.
    """
    message = _collision(*_labelled(inputs, outputs))
    if message:
        raise InvalidOptionError(message)
    for label, path in outputs.items():
        if path is not None:
            _check_writable(label, Path(path))


def report_path_ok(inputs: dict[str, PathLike | None], outputs: dict[str, PathLike | None],
                   report: PathLike | None, label: str = "--report") -> bool:
    """Whether ``report`` may receive a failure report although another path may be bad: it is no
    input, no other output, and it can be written."""
    if report is None:
        return False
    ins, outs = _labelled(inputs, {**{k: v for k, v in outputs.items() if k != label}, label: report})
    if _collision(ins, outs, only=label):
        return False
    try:
        _check_writable(label, Path(report))
    except FlsError:
        return False
    return True


def _check_writable(label: str, path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"{label} {path} is a directory; give a file path")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{label} {path}: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".fls-write-probe-", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{label} {path}: directory {probe} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask): temp files are created 0o600,
    and a published output or report must not stay private to the user who ran the tool."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
