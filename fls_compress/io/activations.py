"""Layer inputs of an ONNX graph, captured with onnxruntime.

Layer-wise compression (OBC / SparseGPT / GPTQ / Wanda) only needs, for every weight W of a
Conv/Gemm/MatMul, the rows of its input X in the (out, in) matrix view, i.e. the layer computes
W X^T. This module

* finds each prunable weight's consumer nodes (:func:`layer_sites`, through ``Identity`` chains) on
  top of :func:`~fls_compress.io.onnx_model.prunable_initializers`, and maps ONNX arrays to and from
  the (out, in) matrix view;
* runs the model in onnxruntime with the activations exposed as extra graph outputs, chunk by chunk
  (:class:`ActivationSession`, :func:`iter_activations`); the layer weights can be made overridable
  inputs so that one session serves every wave of a sequential method; models at the 2 GiB protobuf
  limit are handed to onnxruntime as a file with external data.

The rows of X and their statistics (im2col, row subsampling, X^T X) are in
:mod:`fls_compress.io.layer_rows`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..errors import InvalidDataError, InvalidOptionError, UnsupportedModelError
from .onnx_model import PrunableSite, identity_sources, prunable_initializers

log = logging.getLogger(__name__)

#: Serialized models from this size on are given to onnxruntime as a file with external data.
PROTOBUF_LIMIT = 2**31 - 1


# ------------------------------------------------------------------------------------------------
# Graph analysis
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerUse:
    """One node reading a prunable initializer as its layer weight."""

    node: onnx.NodeProto
    node_index: int
    activation: str
    weight_position: int

    def attr(self, key: str, default: object = None) -> object:
        for a in self.node.attribute:
            if a.name == key:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default


def _role(use: LayerUse) -> str:
    if use.node.op_type == "Gemm":
        return f"Gemm:{use.attr('transB', 0)}"
    return f"{use.node.op_type}:{use.weight_position}"


def layer_sites(
    model: onnx.ModelProto, names: list[str] | None = None
) -> tuple[dict[str, PrunableSite], dict[str, list[LayerUse]]]:
    """The prunable weights (graph order, or the order of ``names``) and the nodes using each as a weight.

    A weight also read in another role (e.g. a Gemm with a different ``transB``) keeps only the uses
    with the first role (warning). An unknown name raises :class:`InvalidOptionError`.
    """
    graph = model.graph
    all_sites = {s.name: s for s in prunable_initializers(model)}
    if names is not None:
        missing = [n for n in names if n not in all_sites]
        if missing:
            raise InvalidOptionError(f"not a Conv/Gemm/MatMul weight of the graph: {', '.join(missing)}")
        sites = {n: all_sites[n] for n in names}
    else:
        sites = all_sites
    inits = {t.name for t in graph.initializer}
    sources = identity_sources(graph, inits)
    uses: dict[str, list[LayerUse]] = {n: [] for n in sites}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        left, right = (sources.get(v, v) for v in node.input[:2])
        if node.op_type != "MatMul":
            hit = (right, 1, node.input[0])
        elif right in inits and left not in inits:
            hit = (right, 1, node.input[0])
        elif left in inits and right not in inits:
            hit = (left, 0, node.input[1])
        else:
            continue
        wname, pos, act = hit
        if wname not in sites or sites[wname].op_type != node.op_type:
            continue
        use = LayerUse(node, index, act, pos)
        if uses[wname] and _role(uses[wname][0]) != _role(use):
            log.warning("weight %r is also read by node %r in another role; that use is ignored", wname, node.name)
            continue
        uses[wname].append(use)
    return sites, uses


def conv_groups(site: PrunableSite, use: LayerUse) -> int:
    return int(use.attr("group", 1)) if site.op_type == "Conv" else 1  # type: ignore[arg-type]


def to_matrix(site: PrunableSite, use: LayerUse, arr: np.ndarray) -> np.ndarray:
    """(out, in) matrix view of the ONNX array (Conv: (O, C/g * prod(kernel)); Gemm: B or B^T; MatMul)."""
    if site.op_type == "Conv":
        return arr.reshape(arr.shape[0], -1)
    if site.op_type == "Gemm":
        return arr if int(use.attr("transB", 0)) else arr.T  # type: ignore[arg-type]
    return arr.T if use.weight_position == 1 else arr


def matrix_shape(site: PrunableSite, use: LayerUse) -> tuple[int, int]:
    """(out, in) of :func:`to_matrix` without touching the data."""
    if site.op_type == "Conv":
        return int(site.shape[0]), int(math.prod(site.shape[1:]))
    rows, cols = int(site.shape[0]), int(site.shape[1])
    if site.op_type == "Gemm":
        return (rows, cols) if int(use.attr("transB", 0)) else (cols, rows)  # type: ignore[arg-type]
    return (cols, rows) if use.weight_position == 1 else (rows, cols)


def from_matrix(site: PrunableSite, use: LayerUse, mat: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_matrix`."""
    if site.op_type == "Conv":
        return mat.reshape(site.shape)
    if site.op_type == "Gemm":
        return mat if int(use.attr("transB", 0)) else mat.T  # type: ignore[arg-type]
    return mat.T if use.weight_position == 1 else mat


# ------------------------------------------------------------------------------------------------
# onnxruntime
# ------------------------------------------------------------------------------------------------
def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def input_batch_axes(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs whose batch axis is not the first (state ``[layers, N, hidden]``, see
    :func:`~fls_compress.io.input_specs.graph_input_specs`): name -> axis. Feeds keep samples on axis 0."""
    from .input_specs import graph_input_specs

    return {spec.name: spec.batch_axis for spec in graph_input_specs(model) if spec.batch_axis}


def _static_batch(model: onnx.ModelProto) -> int | None:
    """A static size on some input's batch axis (the model then takes batches of exactly that size)."""
    axes = input_batch_axes(model)
    for vi in _graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        axis = axes.get(vi.name, 0)
        if len(dims) > axis and dims[axis].HasField("dim_value") and dims[axis].dim_value > 0:
            return int(dims[axis].dim_value)
    return None


def prepare_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph inputs from ``feeds`` (extra keys such as labels dropped); all must have one sample count."""
    names = [vi.name for vi in _graph_inputs(model)]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise InvalidDataError(f"calibration data lacks model input(s): {', '.join(missing)}")
    out = {n: np.asarray(feeds[n]) for n in names}
    if len({int(a.shape[0]) if a.ndim else 1 for a in out.values()}) != 1:
        raise InvalidDataError("calibration inputs disagree on the number of samples")
    return out


def ort_session(model: onnx.ModelProto, *, path_threshold: int = PROTOBUF_LIMIT):
    """An onnxruntime session for ``model`` on the run's providers (:func:`~fls_compress.runtime.session_providers`): from bytes, or from a temporary file with external
    data when the serialized model reaches ``path_threshold`` (protobuf cannot serialize >= 2 GiB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Captured chunks are consumed by torch (im2col, X^T X) between runs: onnxruntime's idle intra-op
    # threads would spin-wait through that work on the same cores (GPTQ's Hessian sums took 1.3 s instead
    # of 0.8 s on the 2-core quantize_cost benchmark). They stop spinning when each run ends, and still
    # spin between the operators of a run (allow_spinning=0 instead made small runs ~1.7x slower).
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    from ..runtime import session_providers

    providers = session_providers()
    try:
        if model.ByteSize() < path_threshold:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="fls-ort-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.onnx.data", size_threshold=1024)
            return ort.InferenceSession(path, opts, providers=providers)  # weights are read at creation
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
        raise UnsupportedModelError(f"onnxruntime cannot run the model to capture layer inputs: {exc}") from exc


def usable_samples(model: onnx.ModelProto, n: int, chunk: int) -> tuple[int, int]:
    """(batch step, samples used): a static batch dimension forces whole batches of that size."""
    static = _static_batch(model)
    step = static if static is not None else max(int(chunk), 1)
    usable = (n // step) * step if static is not None else n
    return step, usable


class ActivationSession:
    """One onnxruntime session exposing intermediate ``values`` as outputs, optionally with some
    initializers made overridable (listed as graph inputs, so each run may feed new values for them).

    Layer-wise methods that process the graph in waves feed the weights already changed by earlier
    waves instead of building a new session per wave (a new session re-serialises, and above 2 GiB
    re-writes, the whole model). ``model`` is restored after the session is built (no copy of it).
    """

    def __init__(self, model: onnx.ModelProto, values: list[str], overridable: list[str] | tuple[str, ...] = ()):
        self.model = model
        inputs = {vi.name for vi in _graph_inputs(model)}
        existing = {vi.name for vi in model.graph.output}
        self.values = [v for v in dict.fromkeys(values) if v not in inputs]
        added = [v for v in self.values if v not in existing]
        listed = {vi.name for vi in model.graph.input}
        inits = {t.name: t for t in model.graph.initializer}
        extra_inputs = [n for n in dict.fromkeys(overridable) if n in inits and n not in listed]
        for v in added:
            model.graph.output.append(onnx.ValueInfoProto(name=v))
        for n in extra_inputs:
            model.graph.input.append(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)))
        try:
            self.session = ort_session(model)
        finally:
            if added:
                del model.graph.output[len(model.graph.output) - len(added) :]
            if extra_inputs:
                del model.graph.input[len(model.graph.input) - len(extra_inputs) :]
        feedable = {i.name for i in self.session.get_inputs()} | {
            i.name for i in self.session.get_overridable_initializers()}
        self.overridable = set(overridable) & feedable

    def iterate(self, feeds: dict[str, np.ndarray], values: list[str], *, chunk: int = 64,
                overrides: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Run over the feeds (samples on axis 0) in chunks of samples (``overrides``: new values of overridable
        initializers); yield the requested values (graph inputs or exposed intermediates) per chunk, in the
        model's layout (an input whose batch axis is not the first is fed with its samples moved there)."""
        feeds = prepare_feeds(self.model, feeds)
        unknown = sorted(set(overrides or {}) - self.overridable)
        if unknown:
            raise ValueError(f"not overridable in this session: {', '.join(unknown)}")
        wanted = [v for v in dict.fromkeys(values) if v not in feeds]
        missing = [v for v in wanted if v not in self.values]
        if missing:
            raise ValueError(f"values not exposed by this session: {', '.join(missing)}")
        n = int(next(iter(feeds.values())).shape[0])
        step, usable = usable_samples(self.model, n, chunk)
        if usable < n:
            log.warning("model takes batches of %d; using %d of %d calibration samples", step, usable, n)
        fixed = {k: np.ascontiguousarray(v) for k, v in (overrides or {}).items()}
        axes = input_batch_axes(self.model)  # samples are on axis 0 of the feeds, on these axes in the model
        for start in range(0, usable, step):
            part = {k: np.moveaxis(v[start : start + step], 0, axes[k]) if k in axes else v[start : start + step]
                    for k, v in feeds.items()}
            got = dict(zip(wanted, self.session.run(wanted, {**part, **fixed}))) if wanted else {}
            yield {v: (part[v] if v in part else got[v]) for v in values}


def iter_activations(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], values: list[str], chunk: int = 64
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` over the feeds in chunks of samples; yield the requested values per chunk.

    ``values`` may name graph inputs or any intermediate tensor; the latter are appended to the graph
    outputs while the session is built (element type left unspecified, onnxruntime infers it) and
    removed again, so ``model`` is unchanged afterwards.
    """
    return ActivationSession(model, values).iterate(feeds, values, chunk=chunk)


def capture_layer_inputs(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], *, chunk: int = 64
) -> dict[str, np.ndarray]:
    """The activation input of each named weight's first consumer, all samples (small models / tests)."""
    from .onnx_model import densify_sparse_initializers

    work = densify_sparse_initializers(model)
    _, uses = layer_sites(work, list(names))
    values = [uses[n][0].activation for n in names]
    parts: dict[str, list[np.ndarray]] = {v: [] for v in values}
    for acts in iter_activations(work, feeds, values, chunk):
        for v in dict.fromkeys(values):
            parts[v].append(np.asarray(acts[v]))
    return {n: np.concatenate(parts[uses[n][0].activation], axis=0) for n in names}
