"""Which operators the bridge cannot convert, and the one-line error that says so.

:func:`unsupported_ops` lists, before any conversion is attempted, the operators of a graph (bodies
included) that have no onnx2torch converter, the compatibility converters of :mod:`.compat`
included; :func:`converter_sources` says who converts each of the others. :func:`unsupported` builds the :class:`~fls_compress.errors.UnsupportedModelError` for a
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


def _source(op: str, version: int, fn) -> str:
    """Who converts ``op`` at ``version``: this package's converter (family), an alias of onnx2torch's
    converter for a type-only newer version, the compatibility layer, or onnx2torch itself."""
    from fls_compress.bridge.ops import TYPE_ONLY_ALIASES

    module = getattr(fn, "__module__", "") or ""
    if module.startswith("fls_compress.bridge.ops."):
        return f"fls_compress (ops.{module.rsplit('.', 1)[-1]})"
    if any(op == a_op and version in versions for a_op, _base, versions in TYPE_ONLY_ALIASES):
        base = next(b for a_op, b, versions in TYPE_ONLY_ALIASES if a_op == op and version in versions)
        owner = "fls_compress" if module.startswith("fls_compress") else "onnx2torch"
        return f"{owner} (opset {base} converter; opset {version} changed only element types)"
    if module.startswith("fls_compress"):
        return f"fls_compress ({module.rsplit('.', 1)[-1]})"
    return "onnx2torch"


def converter_sources(model: onnx.ModelProto) -> dict[str, str]:
    """``"<op> (opset <since_version>)"`` -> who converts it (see :func:`_source`), for every converted
    default-domain operator of the graph (bodies included), in graph order."""
    install_compat()
    opsets = {_normalize_domain(o.domain): int(o.version) for o in model.opset_import}
    found: dict[str, str] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            domain = _normalize_domain(node.domain)
            if domain == "" and "" in opsets and node.op_type not in _CONTROL_FLOW:
                version = _since_version(node.op_type, domain, opsets[""])
                label = f"{node.op_type} (opset {version})"
                if label not in found:
                    try:
                        found[label] = _source(node.op_type, version, get_converter(node.op_type, opsets[""]))
                    except NotImplementedError:
                        pass
            for sub in _subgraphs(node):
                visit(sub)

    visit(model.graph)
    return found


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
