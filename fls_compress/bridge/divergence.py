"""Find the first node where a converted torch graph departs from onnxruntime.

When the converted module's outputs differ from onnxruntime's on the calibration batch
(:mod:`.check`), the culprit is located by running both graphs once with every intermediate value
exposed: onnxruntime with the node outputs added as graph outputs, the torch ``fx`` graph through an
:class:`torch.fx.Interpreter` that records what each converted node (one ``call_module`` per ONNX
node, carrying its ``onnx_mapping``) returns. Values are compared in the graph's topological order;
the first node with an output above the tolerance whose inputs all agree is the first diverging node.
The ONNX reference implementation of the spec then arbitrates between the two on that node's inputs:
either the converter (or the torch kernel behind it) is wrong, or onnxruntime's kernel deviates from
the exact value while the conversion matches it (see :func:`locate_divergence`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx

_LOG = logging.getLogger(__name__)


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """Relative L2 error of ``got`` against ``ref`` (absolute when ``ref`` is zero); non-finite
    entries must sit at the same positions with the same values, else the error is infinite."""
    ref64, got64 = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref64.shape != got64.shape:
        return float("inf")
    finite = np.isfinite(ref64)
    if not np.array_equal(got64[~finite], ref64[~finite], equal_nan=True):
        return float("inf")
    ref64, got64 = ref64[finite], got64[finite]
    norm = float(np.linalg.norm(ref64))
    diff = float(np.linalg.norm(got64 - ref64))
    return diff / norm if norm > 0 else diff


class _Recorder(fx.Interpreter):
    """Runs the fx graph and keeps the outputs of every converted ONNX node, by ONNX value name."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: dict[str, Any] = {}
        self.order: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []  # (node, op, inputs, outputs)

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        sub = self.module.get_submodule(target)
        mapping = getattr(sub, "onnx_mapping", None)
        if mapping is not None:
            outputs = tuple(mapping.outputs)
            if len(outputs) == 1:
                self.values[outputs[0]] = out
            else:
                for name, value in zip(outputs, out):
                    self.values[name] = value
            self.order.append((str(target), type(sub).__name__, tuple(mapping.inputs), outputs))
        return out


def _intermediates(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """onnxruntime's values of ``names`` (those it can expose as outputs) on ``feed``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    produced = {o for n in probe.graph.node for o in n.output}
    wanted = [n for n in dict.fromkeys(names) if n in produced]
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    return dict(zip(out_names, session.run(None, feed)))


def _spec_outputs(model: onnx.ModelProto, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """``node`` evaluated by the ONNX reference implementation of the spec (``onnx.reference``) on
    ``values`` (onnxruntime's values of its inputs); ``None`` when an input is unknown or the
    reference cannot evaluate it."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    inits = {t.name: t for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for name in node.input:
        if not name:
            continue
        if name in values:
            feeds[name] = np.asarray(values[name])
        elif name in inits:
            feeds[name] = numpy_helper.to_array(inits[name])
        else:
            return None
    try:
        graph = helper.make_graph(
            [node], "node",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in feeds.items()],
            [onnx.ValueInfoProto(name=o) for o in node.output if o],
        )
        one = helper.make_model(graph, opset_imports=list(model.opset_import))
        return list(ReferenceEvaluator(one).run(None, feeds))
    except Exception:  # noqa: BLE001 - the arbiter is best effort; no verdict without it
        return None


def _error(got: Any, ref: np.ndarray) -> float:
    if got.is_floating_point():
        return rel_l2(got.detach().cpu().numpy(), ref)
    return 0.0 if np.array_equal(got.detach().cpu().numpy(), ref) else float("inf")


def locate_divergence(
    model: onnx.ModelProto, module: fx.GraphModule, args: list[torch.Tensor], feed: dict[str, np.ndarray],
    tolerance: float,
) -> dict[str, Any]:
    """Where the converted module departs from onnxruntime on one batch.

    ``model`` is the ONNX graph onnxruntime runs on ``feed``; ``module`` the converted fx graph run on
    ``args`` (the same samples). Nodes are visited in topological order; a node *diverges* when one
    of its outputs differs from onnxruntime's by more than ``tolerance`` (relative L2) while none of
    its inputs does. Each diverging node is judged against the ONNX reference implementation of the
    spec evaluated on onnxruntime's input values: when torch's output matches the spec within
    ``tolerance`` and onnxruntime's does not, the divergence is onnxruntime's kernel (e.g. its
    approximate Sigmoid, which returns 0 below -16), ``explained``; the values it feeds are then
    excused downstream. Returns ``{"first": <first unexplained diverging node or None>,
    "explained": [...], "compared": <values compared>}``; each node is ``{"node", "op_type",
    "output", "rel_error", "torch_vs_spec", "onnxruntime_vs_spec"}`` (the last two ``None``
    when the reference cannot evaluate the node).
    """
    recorder = _Recorder(module)
    with torch.no_grad():
        recorder.run(*args)
    by_output = {o: n for n in model.graph.node for o in n.output if o}
    found: dict[str, Any] = {"first": None, "explained": [], "compared": 0}
    try:
        reference = _intermediates(model, feed, list(recorder.values))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        _LOG.warning("cannot expose intermediate values in onnxruntime to locate the divergence: %s",
                     str(exc).splitlines()[0])
        return found
    reference = {**feed, **reference}
    bad: set[str] = set()
    for target, _module_type, inputs, outputs in recorder.order:
        inherited = any(name in bad for name in inputs)
        for name in outputs:
            got = recorder.values.get(name)
            if name not in reference or not torch.is_tensor(got):
                continue
            found["compared"] += 1
            err = _error(got, reference[name])
            if err <= tolerance:
                continue
            bad.add(name)
            if inherited:
                continue
            node = by_output.get(name)
            entry = {"node": node.name if node is not None and node.name else target,
                     "op_type": node.op_type if node is not None else "?", "output": name, "rel_error": err,
                     "torch_vs_spec": None, "onnxruntime_vs_spec": None}
            spec = _spec_outputs(model, node, reference) if node is not None else None
            if spec is not None:
                index = [o for o in node.output if o].index(name)
                entry["torch_vs_spec"] = _error(got, spec[index])
                entry["onnxruntime_vs_spec"] = rel_l2(reference[name], spec[index])
            if entry["torch_vs_spec"] is not None and entry["torch_vs_spec"] <= tolerance < entry["onnxruntime_vs_spec"]:
                found["explained"].append(entry)
                continue
            found["first"] = entry
            return found
    return found
