"""Reading calibration arrays from ``.npz`` / ``.npy`` files and directories of them.

File-format problems (missing, truncated, mislabelled, pickled object arrays) become one-line
:class:`~fls_compress.errors.InvalidDataError` messages naming the file; the layout rules are
described in :mod:`fls_compress.io.calibration`. Nothing here checks arrays against the graph.
"""

from __future__ import annotations

import tokenize
import zipfile
from pathlib import Path

import numpy as np

from fls_compress.errors import InvalidDataError, first_line
from fls_compress.io.input_specs import InputSpec

LABELS_KEY = "labels"
"""Array name that holds labels in a ``.npz`` file (unless a graph input has that name)."""


def batch_axes_of(specs: dict[str, InputSpec]) -> dict[str, int]:
    """Inputs whose batch axis is not 0, with that axis."""
    return {name: spec.batch_axis for name, spec in specs.items() if spec.batch_axis}



_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip


def _check_magic(path: Path, magics: tuple[bytes, ...], kind: str) -> None:
    """Refuse files that do not start like a ``.npy`` / ``.npz`` file.

    Without this, :func:`numpy.load` treats any unknown content as a pickle and reports "pickled
    data", which would be a misleading message for a truncated or mislabelled file.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(max(len(m) for m in magics))
    except OSError as exc:
        raise InvalidDataError(f"{path}: cannot be read ({first_line(exc)})") from exc
    if not any(head.startswith(m) for m in magics):
        raise InvalidDataError(f"{path}: not a readable {kind} file (unrecognised file header)")


_HEADER_ERRORS = (SyntaxError, tokenize.TokenError)
"""What numpy's header parser (``ast.literal_eval`` over tokenized text) raises on a corrupt header."""


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` file, with file-format problems turned into :class:`InvalidDataError`."""
    _check_magic(path, _ZIP_MAGICS, ".npz")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InvalidDataError(f"{path}: holds object arrays (pickled data), which are not supported") from exc
        raise InvalidDataError(f"{path}: not a readable .npz file ({first_line(exc)})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, *_HEADER_ERRORS) as exc:
        raise InvalidDataError(f"{path}: not a readable .npz file ({first_line(exc)})") from exc
    if not arrays:
        raise InvalidDataError(f"{path}: the .npz file contains no arrays")
    return arrays


def read_npy(path: Path) -> np.ndarray:
    """One ``.npy`` array, with file-format problems turned into :class:`InvalidDataError`."""
    _check_magic(path, (_NPY_MAGIC,), ".npy")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InvalidDataError(f"{path}: holds object arrays (pickled data), which are not supported") from exc
        raise InvalidDataError(f"{path}: not a readable .npy file ({first_line(exc)})") from exc
    except (OSError, EOFError, *_HEADER_ERRORS) as exc:
        raise InvalidDataError(f"{path}: not a readable .npy file ({first_line(exc)})") from exc
    return array


def _add_sample_axis(arrays: dict[str, np.ndarray], specs: dict[str, InputSpec]) -> dict[str, np.ndarray]:
    """Give single-sample arrays (rank one below the input's, or a scalar label) a sample axis of length 1."""
    result = {}
    for name, arr in arrays.items():
        spec = specs.get(name)
        if spec is not None and spec.shape is not None and arr.ndim == len(spec.shape) - 1:
            arr = np.expand_dims(arr, spec.batch_axis)
        elif spec is None and name == LABELS_KEY and arr.ndim == 0:
            arr = arr.reshape(1)
        result[name] = arr
    return result


def _concatenate_parts(
    parts: list[tuple[str, dict[str, np.ndarray]]],
    where: str,
    scalars: frozenset[str] = frozenset(),
    axes: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Join per-file arrays along their batch axis (``axes``, default 0); every file must name the
    same arrays. Arrays of rank-0 inputs (``scalars``) are not joined: every file must hold the same
    value, which is kept once."""
    axes = axes or {}
    first_file, first = parts[0]
    names = set(first)
    merged: dict[str, list[np.ndarray]] = {name: [] for name in first}
    for file_name, arrays in parts:
        if set(arrays) != names:
            raise InvalidDataError(
                f"{where}: {file_name} holds arrays {sorted(arrays)} but {first_file} holds {sorted(names)}"
            )
        for name, arr in arrays.items():
            merged[name].append(arr)
    result = {}
    for name, pieces in merged.items():
        if name in scalars:
            if any(p.shape != pieces[0].shape or not np.array_equal(p, pieces[0]) for p in pieces):
                raise InvalidDataError(f"{where}: files disagree on the value of scalar input '{name}'")
            result[name] = pieces[0]
            continue
        scalar = next((file for (file, _), p in zip(parts, pieces) if p.ndim == 0), None)
        if scalar is not None:
            raise InvalidDataError(f"{where}: '{name}' in {scalar} is a scalar; expected one sample or a batch")
        axis = axes.get(name, 0)
        tails = {p.shape[:axis] + p.shape[axis + 1 :] for p in pieces}
        if len({p.ndim for p in pieces}) > 1 or len(tails) > 1:
            shapes = ", ".join(str(p.shape) for p in pieces[:3])
            raise InvalidDataError(f"{where}: files disagree on the shape of '{name}' ({shapes}, ...)")
        result[name] = np.concatenate(pieces, axis=axis)
    return result


def read_directory(path: Path, specs: dict[str, InputSpec]) -> dict[str, np.ndarray]:
    """Arrays from a directory of ``.npz`` or ``.npy`` files (see the module docstring for the layout)."""
    npz_files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".npz")
    npy_files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".npy")
    label_files = [p for p in npy_files if p.stem == LABELS_KEY and LABELS_KEY not in specs]
    npy_files = [p for p in npy_files if p not in label_files]
    if not npz_files and not npy_files:
        raise InvalidDataError(f"{path}: directory contains no .npz or .npy files")
    if npz_files and npy_files:
        raise InvalidDataError(f"{path}: directory mixes .npz and .npy files; use one kind")

    if npz_files:
        parts = [(p.name, _add_sample_axis(read_npz(p), specs)) for p in npz_files]
        scalars = frozenset(n for n, spec in specs.items() if spec.is_scalar)
        arrays = _concatenate_parts(parts, str(path), scalars, batch_axes_of(specs))
    elif all(p.stem in specs for p in npy_files):
        # One file per input, each holding that input's whole batch.
        arrays = {p.stem: read_npy(p) for p in npy_files}
    elif len(specs) == 1:
        (name,) = specs
        parts = [(p.name, _add_sample_axis({name: read_npy(p)}, specs)) for p in npy_files]
        arrays = _concatenate_parts(parts, str(path), axes=batch_axes_of(specs))
    else:
        stray = next(p.name for p in npy_files if p.stem not in specs)
        raise InvalidDataError(
            f"{path}: {stray} is not named after a model input ({', '.join(repr(s) for s in specs)}); "
            "for a multi-input model name each .npy file after its input or use .npz files"
        )
    if label_files:
        if LABELS_KEY in arrays:
            raise InvalidDataError(f"{path}: labels are given both in labels.npy and inside the .npz files")
        arrays[LABELS_KEY] = read_npy(label_files[0])
    return arrays


def load_labels(path: str | Path) -> np.ndarray:
    """Read a labels file: a ``.npy`` array, or a ``.npz`` with a ``labels`` array (or a single array)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidDataError(f"{p}: labels file does not exist")
    if p.suffix == ".npy":
        return read_npy(p)
    if p.suffix == ".npz":
        arrays = read_npz(p)
        if LABELS_KEY in arrays:
            return arrays[LABELS_KEY]
        if len(arrays) == 1:
            return next(iter(arrays.values()))
        raise InvalidDataError(f"{p}: holds several arrays but none named '{LABELS_KEY}'")
    raise InvalidDataError(f"{p}: unsupported labels file type '{p.suffix}' (expected .npy or .npz)")
