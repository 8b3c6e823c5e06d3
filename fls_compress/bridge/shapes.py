"""Fill in the tensor shapes onnx2torch needs but ONNX shape inference could not derive.

Several onnx2torch converters (BatchNormalization, MaxPool, AveragePool, GlobalAveragePool,
InstanceNormalization) pick the torch layer from the *rank* of their input, read from
``graph.value_info``. ONNX shape inference leaves that rank unknown after a Reshape whose target
shape is computed at run time (``Shape -> Gather -> Concat -> Reshape``, common in paddle2onnx and
detector exports), and the converters then fail with "spatial rank == -2".

:func:`annotate_shapes` observes the missing shapes instead: every top-level value without an
inferred shape is exposed as an extra graph output of a copy of the model, onnxruntime runs that copy
on a few calibration batches, and the observed shapes are written into ``value_info`` (dimensions
that differ between batches as the symbolic dimension ``"?"``). Only the copy used for conversion is
annotated.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

_LOG = logging.getLogger(__name__)


def _known_shapes(model: onnx.ModelProto) -> set[str]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference errors only mean "nothing inferred"
        inferred = model
    graph = inferred.graph
    known = {t.name for t in graph.initializer}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            known.add(vi.name)
    return known


def missing_shapes(model: onnx.ModelProto) -> list[str]:
    """Top-level node outputs whose rank ONNX shape inference cannot determine, in graph order."""
    known = _known_shapes(model)
    return [out for node in model.graph.node for out in node.output if out and out not in known]


def annotate_shapes(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with observed shapes for the values :func:`missing_shapes` lists.

    Returns the copy and the names annotated. Without feeds, or when onnxruntime cannot run the
    exposed copy, the model is returned unchanged with a logged warning (conversion may then fail
    on the values listed).
    """
    missing = missing_shapes(model)
    if not missing or not feeds:
        return model, []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {vi.name for vi in probe.graph.output}
    exposed = [name for name in missing if name not in outputs]
    for name in exposed:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        observed: dict[str, list[tuple[int, ...]]] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(None, feed)):
                if name in missing and isinstance(value, np.ndarray):
                    observed.setdefault(name, []).append(tuple(value.shape))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        _LOG.warning("could not observe %d tensor shape(s) with onnxruntime: %s", len(missing), str(exc).splitlines()[0])
        return model, []
    annotated = onnx.ModelProto()
    annotated.CopyFrom(model)
    elem_types = {}
    for out in session.get_outputs():
        elem_types[out.name] = out.type
    done = []
    for name, shapes in observed.items():
        if len({len(s) for s in shapes}) != 1:
            continue
        dims: list[int | str] = [
            d if all(s[axis] == d for s in shapes) else "?" for axis, d in enumerate(shapes[0])
        ]
        elem = _ort_elem_type(elem_types.get(name, ""))
        annotated.graph.value_info.append(helper.make_tensor_value_info(name, elem, dims))
        done.append(name)
    _LOG.info("annotated %d tensor shape(s) observed with onnxruntime", len(done))
    return annotated, done


_ORT_TYPES = {
    "tensor(float)": onnx.TensorProto.FLOAT,
    "tensor(float16)": onnx.TensorProto.FLOAT16,
    "tensor(double)": onnx.TensorProto.DOUBLE,
    "tensor(int64)": onnx.TensorProto.INT64,
    "tensor(int32)": onnx.TensorProto.INT32,
    "tensor(bool)": onnx.TensorProto.BOOL,
    "tensor(int8)": onnx.TensorProto.INT8,
    "tensor(uint8)": onnx.TensorProto.UINT8,
}


def _ort_elem_type(name: str) -> int:
    return _ORT_TYPES.get(name, onnx.TensorProto.UNDEFINED)
