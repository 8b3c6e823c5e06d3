"""Reading, inspecting, rewriting and saving ONNX models.

The tool never re-exports a model: the pruned weights are written back into the *original*
``ModelProto`` (same nodes, names, opsets, metadata), so everything the exporter produced that torch
does not understand survives untouched. This module owns every direct manipulation of tensors in a
``ModelProto``:

* :func:`load_onnx` - load and validate a file (external data included), user errors as
  :class:`~fls_compress.errors.InvalidModelError`;
* :func:`prunable_sites` (defined in :mod:`fls_compress.io.sites`, re-exported here) - which tensors
  are weights of Conv/Gemm/MatMul (and LSTM/GRU on request): initializers and ``Constant`` node
  values, of the top-level graph and, on request, of If/Loop/Scan bodies;
* :func:`read_weight` - one weight's array, wherever it is stored;
* :func:`write_back` - a deep copy with some weights replaced (initializers in place, optionally as
  spec-conformant ``sparse_initializer`` when that is smaller; Constant weights inside the SAME
  node's ``value`` attribute);
* :func:`save_onnx_atomic` - write-to-temp then ``os.replace``, so a crash never leaves half a file;
* helpers that read tensors (dense or sparse), densify sparse initializers (onnx2torch cannot read
  them), measure sparsity and size.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fls_compress.errors import InvalidModelError, InvalidOptionError, first_line
from fls_compress.io.paths import default_file_mode
from fls_compress.io.sites import (  # noqa: F401 - re-exported: the site API lives in io.sites
    ALL_PRUNABLE_OPS,
    RECURRENT_OPS,
    STORAGE_CONSTANT,
    STORAGE_INITIALIZER,
    SUPPORTED_PRUNABLE_OPS,
    PrunableSite,
    all_graphs,
    constant_tensors,
    identity_sources,
    prunable_initializers,
    prunable_sites,
)

_LOG = logging.getLogger(__name__)

#: Protobuf cannot serialize messages of 2 GiB or more; above this size tensors go to external data.
_PROTOBUF_LIMIT = 2**31 - 1

#: TensorProto fields that hold the payload; cleared before a replacement payload is merged in.
_DATA_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "raw_data",
    "external_data",
    "data_location",
)


# ------------------------------------------------------------------------------------------------
# Loading and saving
# ------------------------------------------------------------------------------------------------
def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load ``path`` (with its external data) and run ``onnx.checker.check_model`` on it.

    Every failure a user can cause (missing path, directory, unreadable, not a protobuf, checker
    failure) is raised as :class:`InvalidModelError` with a one-line message naming the file. The
    file is only read.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidModelError(f"model file not found: {p}")
    if p.is_dir():
        raise InvalidModelError(f"model path is a directory, not an ONNX file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - protobuf/OS/onnx raise many unrelated types
        raise InvalidModelError(f"cannot read ONNX model {p}: {first_line(exc)}") from exc
    try:
        # The path form also validates external-data references and works above 2 GiB.
        onnx.checker.check_model(str(p))
    except Exception as exc:  # noqa: BLE001 - ValidationError, and C++ errors on garbage input
        raise InvalidModelError(f"invalid ONNX model {p}: {first_line(exc)}") from exc
    _check_payloads(model, p)
    _LOG.debug("loaded %s (%d nodes, %d initializers)", p, len(model.graph.node), len(model.graph.initializer))
    return model


_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def _check_payloads(model: onnx.ModelProto, path: Path) -> None:
    """Every inline initializer holds as many elements as its dims say (the checker does not look)."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            continue
        numel = int(np.prod([int(d) for d in t.dims], dtype=np.int64)) if t.dims else 1
        try:
            if t.raw_data:
                if t.data_type in _PACKED_4BIT:
                    want = (numel + 1) // 2
                else:
                    want = numel * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                if len(t.raw_data) != want:
                    raise ValueError(f"{len(t.raw_data)} bytes of data for dims {list(t.dims)} ({want} expected)")
            else:
                numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - numpy/onnx raise ValueError, TypeError, KeyError
            raise InvalidModelError(f"invalid ONNX model {path}: initializer '{t.name}': {first_line(exc)}") from exc


def ensure_distinct_paths(inp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Refuse to write the output over the input model (:class:`InvalidOptionError`)."""
    src, dst = Path(inp), Path(out)
    same = src.resolve() == dst.resolve()
    if not same and src.exists() and dst.exists():
        same = os.path.samefile(src, dst)
    if same:
        raise InvalidOptionError(f"output path {dst} is the input model; choose another output path")


def save_onnx_atomic(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data_threshold: int = _PROTOBUF_LIMIT,
) -> None:
    """Write ``model`` to ``path`` atomically (temp file in the same directory, then ``os.replace``).

    Parent directories are created. Models whose serialized size reaches ``external_data_threshold``
    (default: the 2 GiB protobuf limit) are saved with their tensors in ``<name>.data`` next to the
    file; both files are first written into a temporary directory and then moved into place.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model_size_bytes(model) < external_data_threshold:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(model.SerializeToString())
            os.chmod(tmp, default_file_mode())  # mkstemp files are 0o600
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return

    data_name = f"{out.name}.data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        external = onnx.ModelProto()
        external.CopyFrom(model)
        onnx.save_model(
            external,
            str(tmp_dir / out.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        for name in (data_name, out.name):
            os.chmod(tmp_dir / name, default_file_mode())
        os.replace(tmp_dir / data_name, out.parent / data_name)
        os.replace(tmp_dir / out.name, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Inspection
# ------------------------------------------------------------------------------------------------
def read_weight(model: onnx.ModelProto, name: str, base_dir: str = "") -> np.ndarray:
    """The array of the weight called ``name``: a dense or sparse initializer, or a Constant value."""
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor, base_dir)
    for sparse in graph.sparse_initializer:
        if sparse.values.name == name:
            return _sparse_to_array(sparse)
    tensor = _in_place_tensors(graph).get(name)
    if tensor is not None:
        return numpy_helper.to_array(tensor, base_dir)
    raise ValueError(f"no initializer or Constant node named {name!r} in the model")


def _in_place_tensors(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """Weights rewritten in place: top-level Constant values, and the initializers and Constant
    values of every If/Loop/Scan body (the TensorProto objects themselves)."""
    found = {name: tensor for name, (_, tensor) in constant_tensors(graph).items()}
    for path, body in all_graphs(graph):
        if path is None:
            continue
        for tensor in body.initializer:
            found.setdefault(tensor.name, tensor)
        for name, (_, tensor) in constant_tensors(body).items():
            found.setdefault(name, tensor)
    return found


def _sparse_to_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Dense array of a sparse tensor (linear ``[NNZ]`` or coordinate ``[NNZ, rank]`` indices)."""
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def read_initializer_arrays(model: onnx.ModelProto, base_dir: str = "") -> dict[str, np.ndarray]:
    """Every top-level initializer as a numpy array, sparse initializers densified.

    ``base_dir`` is only needed for a model whose external data was not loaded.
    """
    arrays = {t.name: numpy_helper.to_array(t, base_dir) for t in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        arrays[sparse.values.name] = _sparse_to_array(sparse)
    return arrays


def densify_sparse_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``sparse_initializer`` entries are ordinary dense initializers."""
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    for sparse in dense.graph.sparse_initializer:
        dense.graph.initializer.append(numpy_helper.from_array(_sparse_to_array(sparse), sparse.values.name))
    del dense.graph.sparse_initializer[:]
    return dense


def weight_sparsity(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Fraction of exact zeros in each named weight, as stored in the model (dense or sparse
    initializer, or ``Constant`` node value)."""
    result: dict[str, float] = {}
    for name in names:
        arr = read_weight(model, name)
        result[name] = float(np.count_nonzero(arr == 0)) / arr.size if arr.size else 0.0
    return result


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes (external data counts only once it is loaded inline).

    Protobuf refuses to size a message of 2 GiB or more; such a model is measured part by part
    (tensor payloads plus every other graph field), exact to a few bytes per tensor."""
    try:
        return int(model.ByteSize())
    except Exception:  # noqa: BLE001 - google.protobuf.message.EncodeError above 2 GiB
        return _size_by_parts(model)


def _tensor_size(t: TensorProto) -> int:
    try:
        return int(t.ByteSize())
    except Exception:  # noqa: BLE001 - one tensor of 2 GiB or more
        return len(t.raw_data) + 16 * (1 + len(t.dims)) + len(t.name)


def _size_by_parts(model: onnx.ModelProto) -> int:
    graph = model.graph
    total = sum(_tensor_size(t) for t in graph.initializer)
    total += sum(sp.ByteSize() for sp in graph.sparse_initializer)
    total += sum(part.ByteSize() for field in (graph.node, graph.input, graph.output, graph.value_info) for part in field)
    total += sum(op.ByteSize() for op in model.opset_import) + sum(p.ByteSize() for p in model.metadata_props)
    return int(total)


def sparse_bytes_saved(model: onnx.ModelProto) -> int:
    """Bytes the model's ``sparse_initializer`` entries save against storing them dense."""
    saved = 0
    for sparse in model.graph.sparse_initializer:
        dense = numpy_helper.from_array(_sparse_to_array(sparse), sparse.values.name)
        dense.doc_string = sparse.values.doc_string
        saved += dense.ByteSize() - sparse.ByteSize()
    return saved


# ------------------------------------------------------------------------------------------------
# Write-back
# ------------------------------------------------------------------------------------------------
def _to_sparse(dense: onnx.TensorProto, arr: np.ndarray) -> onnx.SparseTensorProto:
    """Spec-conformant sparse form of ``dense`` (holding ``arr``): values carry its name and doc
    string, indices are ascending int64 linear offsets."""
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[idx]), dense.name)
    values.doc_string = dense.doc_string
    indices = numpy_helper.from_array(idx)
    return helper.make_sparse_tensor(values, indices, list(arr.shape))


def write_back(
    original: onnx.ModelProto, arrays: dict[str, np.ndarray], *, sparse: bool = False
) -> onnx.ModelProto:
    """A deep copy of ``original`` with the named weights' data replaced by ``arrays``.

    A name is an initializer (dense or sparse) or the output of a ``Constant`` node, of the top-level
    graph or of an If/Loop/Scan body; a Constant weight is rewritten inside that same node's
    ``value`` attribute (the node, its name and every other attribute stay as they are), a body
    initializer inside its body. Each array must have exactly the tensor's dtype and
    shape (``ValueError`` otherwise). The tensor keeps its name, doc string and metadata; only its
    payload changes, written inline even if the original used external data. Nodes, graph
    inputs/outputs, opsets, IR version, producer and metadata are untouched.

    With ``sparse=True`` each replaced tensor is moved to ``graph.sparse_initializer`` (int64 linear
    indices, as the ONNX checker requires) when that is strictly smaller than the dense tensor and
    the tensor is not also listed as a graph input. :func:`sparse_bytes_saved` reports the saving.
    Initializers already stored sparse in ``original`` are replaced the same way. Constant-node
    and body weights always stay dense (a ``sparse_value`` attribute would change the node).
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    dense_index = {t.name: i for i, t in enumerate(graph.initializer)}
    sparse_index = {t.values.name: i for i, t in enumerate(graph.sparse_initializer)}
    graph_inputs = {vi.name for vi in graph.input}
    constants = _in_place_tensors(graph)

    to_sparsify: list[tuple[str, np.ndarray]] = []
    drop_sparse: set[int] = set()
    for name, value in arrays.items():
        arr = np.asarray(value)
        if name in dense_index:
            target = graph.initializer[dense_index[name]]
            want_shape = tuple(int(d) for d in target.dims)
        elif name in sparse_index:
            target = graph.sparse_initializer[sparse_index[name]].values
            want_shape = tuple(int(d) for d in graph.sparse_initializer[sparse_index[name]].dims)
        elif name in constants:
            target = constants[name]
            want_shape = tuple(int(d) for d in target.dims)
        else:
            raise ValueError(f"no initializer or Constant node named {name!r} in the model")
        want_dtype = helper.tensor_dtype_to_np_dtype(target.data_type)
        if arr.dtype != want_dtype:
            raise ValueError(f"initializer {name!r}: dtype {arr.dtype} does not match the model's {want_dtype}")
        if arr.shape != want_shape:
            raise ValueError(f"initializer {name!r}: shape {arr.shape} does not match the model's {want_shape}")

        if name in sparse_index:
            # Re-materialize as a dense initializer; it may be sparsified again below.
            drop_sparse.add(sparse_index[name])
            dense = numpy_helper.from_array(np.ascontiguousarray(arr), name)
            dense.doc_string = target.doc_string
            graph.initializer.append(dense)
            dense_index[name] = len(graph.initializer) - 1
        else:
            payload = numpy_helper.from_array(np.ascontiguousarray(arr))
            payload.ClearField("dims")
            payload.ClearField("data_type")
            for field_name in _DATA_FIELDS:
                target.ClearField(field_name)
            target.MergeFrom(payload)
        if sparse and name not in graph_inputs and name not in constants:
            to_sparsify.append((name, arr))

    for i in sorted(drop_sparse, reverse=True):
        del graph.sparse_initializer[i]

    moved: set[str] = set()
    for name, arr in to_sparsify:
        dense = graph.initializer[dense_index[name]]
        candidate = _to_sparse(dense, arr)
        if candidate.ByteSize() < dense.ByteSize():
            graph.sparse_initializer.append(candidate)
            moved.add(name)
    if moved:
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name in moved:
                del graph.initializer[i]
        _LOG.info("stored %d initializer(s) as sparse_initializer", len(moved))
    return model
