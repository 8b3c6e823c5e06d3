"""Evaluate, once, weights that the graph computes from constants (for converters that need them).

The TorchScript exporter writes ``nn.LSTM`` weights of some models (e.g. Silero VAD) not as
initializers but as ``Unsqueeze(Concat(Slice(W_ih), ...))`` chains that reorder the gates at run
time. Every input of such a chain is a constant, so its value is a constant too; the LSTM/GRU
converter needs it as one. :func:`fold_recurrent_weights` finds W / R / B inputs of LSTM/GRU nodes
that are produced by nodes depending on constants only, computes them with onnxruntime (on the
constant-only part of the graph, which needs no inputs) and stores them as initializers in the copy
used for conversion, dropping the producing nodes' link (the original model is untouched; these
weights are not prunable sites since they are not stored tensors of the original graph).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

_LOG = logging.getLogger(__name__)
_RECURRENT = ("LSTM", "GRU", "RNN")


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """Values computable from initializers and Constant nodes alone (top level, graph order)."""
    known = {t.name for t in graph.initializer}
    inputs = {vi.name for vi in graph.input} - known
    for node in graph.node:
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        args = [v for v in node.input if v]
        if not has_subgraph and all(v in known and v not in inputs for v in args):
            known.update(o for o in node.output if o)
    return known


def fold_recurrent_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose computed-constant LSTM/GRU W/R/B inputs are initializers.

    Returns the copy and the folded value names (``[]`` and ``model`` itself when there is nothing to
    fold or onnxruntime cannot evaluate them, with a warning in the latter case).
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    wanted = []
    for node in graph.node:
        if node.op_type in _RECURRENT and node.domain in ("", "ai.onnx"):
            wanted.extend(v for v in list(node.input)[1:4] if v and v not in inits and v not in wanted)
    if not wanted:
        return model, []
    constant = _constant_values(graph)
    wanted = [v for v in wanted if v in constant]
    if not wanted:
        return model, []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    keep = [n for n in probe.graph.node if [o for o in n.output if o] and all(o in constant for o in n.output if o)]
    del probe.graph.node[:]
    probe.graph.node.extend(keep)  # the constant-only part of the graph: it needs no inputs
    del probe.graph.input[:]
    del probe.graph.output[:]
    del probe.graph.value_info[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {})))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        _LOG.warning("could not evaluate %d computed recurrent weight(s): %s", len(wanted), str(exc).splitlines()[0])
        return model, []
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    for node in folded.graph.node:
        kept = [o if o not in wanted else "" for o in node.output]
        if kept != list(node.output):
            del node.output[:]
            node.output.extend(kept)
    for name in wanted:
        folded.graph.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    _LOG.info("evaluated %d recurrent weight(s) computed from constants", len(wanted))
    return folded, wanted
