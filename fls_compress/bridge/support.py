"""Which operators the bridge cannot convert, and the one-line error that says so.

:func:`unsupported_ops` lists, before any conversion is attempted, the operators of a graph (bodies
included) that have no onnx2torch converter, the compatibility converters of :mod:`.compat`
included. :func:`unsupported` builds the :class:`~fls_compress.errors.UnsupportedModelError` for a
graph that cannot be converted, naming the pruning methods that work without a torch graph.
"""

from __future__ import annotations

import onnx
from onnx import defs
from onnx2torch.node_converters.registry import get_converter

from fls_compress.bridge.compat import install_compat
from fls_compress.errors import UnsupportedModelError

#: Control-flow ops: onnx2torch converts none of them (their bodies are subgraphs); the bridge folds
#: data-constant ``If`` nodes before conversion (:mod:`.control_flow`).
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _normalize_domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _since_version(op_type: str, domain: str, opset: int) -> int:
    try:
        return int(defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version)
    except defs.SchemaError:
        return opset


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Operators with no onnx2torch converter (compat included), e.g. ``["LSTM (opset 14)"]``.

    Every node is checked, subgraph bodies included; If/Loop/Scan are always unsupported. Entries
    are unique, in graph order, formatted ``"<op> (opset <since_version>)"`` with ``<domain>::``
    prepended outside the default domain.
    """
    install_compat()
    opsets = {_normalize_domain(o.domain): int(o.version) for o in model.opset_import}
    found: dict[str, None] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = _normalize_domain(node.domain)
            opset = opsets.get(domain)
            version = _since_version(node.op_type, domain, opset) if opset is not None else 0
            label = f"{node.op_type} (opset {version})" if not domain else f"{domain}::{node.op_type} (opset {version})"
            if node.op_type in _CONTROL_FLOW or opset is None:
                found[label] = None
            else:
                try:
                    get_converter(operation_type=node.op_type, version=opset, domain=domain)
                except NotImplementedError:
                    found[label] = None
            for sub in _subgraphs(node):
                visit(sub)

    visit(model.graph)
    return list(found)


def _torch_free_methods() -> list[str]:
    """Registered pruning methods that work from onnxruntime activations alone (no torch graph)."""
    try:
        from fls_compress.curvature.fishleg import FishLegConfig
        from fls_compress.pruning.registry import MethodOptions, available_methods, make_pruner

        opts = MethodOptions(fishleg=FishLegConfig())
        return [m for m in available_methods() if getattr(make_pruner(m, opts), "needs_onnx_model", False)]
    except Exception:  # noqa: BLE001 - the hint must never hide the conversion error itself
        return ["sparsegpt", "wanda"]


def unsupported(message: str) -> UnsupportedModelError:
    methods = _torch_free_methods()
    hint = f"; methods that need no torch graph still work: -m {'|'.join(methods)}" if methods else ""
    return UnsupportedModelError(message + hint)
