"""Fold ``If`` nodes whose condition is constant on the calibration data.

onnx2torch converts no control flow. Real exports often branch on a value that does not change for a
given deployment, e.g. a voice-activity model's ``If(sample_rate == 16000)``. :func:`fold_constant_ifs`
runs the model with onnxruntime on the calibration batches, with every top-level ``If`` condition
exposed as an extra output; an ``If`` whose condition is the same on every batch is replaced, in the
copy used for conversion only, by the nodes of the branch taken (its initializers moved to the graph,
its outputs renamed through ``Identity`` to the ``If``'s outputs). Nested ``If`` nodes surface at the
top level and are folded on the next round. What was folded is returned so reports can say so; the
compressed model keeps the original ``If`` and both branches (the weights of the taken branch are
pruned and written back inside that branch, see :func:`fls_compress.bridge.convert.convert_to_torch`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

_LOG = logging.getLogger(__name__)
_MAX_ROUNDS = 8


def _conditions(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, set[bool]]:
    inits = {t.name: t for t in model.graph.initializer}
    values: dict[str, set[bool]] = {}
    to_run = []
    for name in names:
        if name in inits:
            values[name] = {bool(numpy_helper.to_array(inits[name]).reshape(-1)[0])}
        else:
            to_run.append(name)
    if to_run and feeds:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        outputs = {vi.name for vi in probe.graph.output}
        for name in to_run:
            if name not in outputs:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        out_names = [o.name for o in session.get_outputs()]
        for feed in feeds:
            for name, value in zip(out_names, session.run(None, feed)):
                if name in to_run:
                    values.setdefault(name, set()).add(bool(np.asarray(value).reshape(-1)[0]))
    return values


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {vi.name for vi in graph.input}
    for node in graph.node:
        names.update(node.output)
    return names


def _inline(graph: onnx.GraphProto, index: int, branch: onnx.GraphProto) -> bool:
    node = graph.node[index]
    clash = (_all_names(branch) - {vi.name for vi in branch.output}) & _all_names(graph)
    if clash:
        _LOG.warning("If node %r: branch value names clash with the graph (%s); not folded", node.name, sorted(clash)[:3])
        return False
    new_nodes = list(branch.node) + [
        helper.make_node("Identity", [src.name], [dst], name=f"{node.name or 'If'}_folded_{i}")
        for i, (src, dst) in enumerate(zip(branch.output, node.output))
        if dst
    ]
    graph.initializer.extend(branch.initializer)
    kept = list(graph.node[:index]) + new_nodes + list(graph.node[index + 1 :])
    del graph.node[:]
    graph.node.extend(kept)
    return True


def fold_constant_ifs(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, list[dict[str, object]]]:
    """A copy of ``model`` with data-constant ``If`` nodes replaced by their taken branch.

    Returns the copy and one record per folded node: ``{"node", "condition", "branch",
    "value_constant_on": number of batches}``. An ``If`` whose condition varies is left in place.
    """
    folded: list[dict[str, object]] = []
    current = model
    for _ in range(_MAX_ROUNDS):
        ifs = [(i, n) for i, n in enumerate(current.graph.node) if n.op_type == "If" and n.domain in ("", "ai.onnx")]
        if not ifs:
            break
        try:
            values = _conditions(current, [n.input[0] for _, n in ifs], feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
            _LOG.warning("could not evaluate If conditions with onnxruntime: %s", str(exc).splitlines()[0])
            break
        work = onnx.ModelProto()
        work.CopyFrom(current)
        changed = False
        for index, node in sorted(ifs, key=lambda item: -item[0]):
            seen = values.get(node.input[0], set())
            if len(seen) != 1:
                if len(seen) > 1:
                    _LOG.warning("If node %r: condition varies over the calibration data; not folded", node.name)
                continue
            cond = next(iter(seen))
            branch_name = "then_branch" if cond else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == branch_name)
            if _inline(work.graph, index, branch):
                changed = True
                folded.append({"node": node.name or f"If_{index}", "condition": cond, "branch": branch_name,
                               "value_constant_on": max(len(feeds), 1)})
                _LOG.warning("If node %r: condition is %s on all calibration data; converting the %s only",
                             node.name, cond, branch_name)
        current = work
        if not changed:
            break
    return current, folded
