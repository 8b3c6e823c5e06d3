"""Assert that a compressed model is its original with only the pruned weight payloads changed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from fls_compress.io.sites import all_graphs, constant_tensors

_PAYLOAD = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data", "external_data",
            "data_location", "string_data")


def _masked(model: onnx.ModelProto, rewritten: set[str]) -> onnx.ModelProto:
    """A copy whose rewritten tensors (initializers or Constant values, in any body) have no payload."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for _, graph in all_graphs(copy.graph):
        tensors = [t for t in graph.initializer if t.name in rewritten]
        tensors += [t for name, (_, t) in constant_tensors(graph).items() if name in rewritten]
        for tensor in tensors:
            for field_name in _PAYLOAD:
                tensor.ClearField(field_name)
    return copy


def assert_same_graph_except(original: onnx.ModelProto, compressed: onnx.ModelProto, rewritten: set[str]) -> None:
    """Nodes (with their attributes and bodies), names, graph I/O, value_info, opsets, IR version,
    producer and metadata are identical once the payloads of the ``rewritten`` tensors are masked
    (their dims and dtypes included); top-level initializers keep their order, names, dims, dtypes
    and doc strings, and those not rewritten hold identical arrays (external data may be inlined)."""
    m0, m1 = _masked(original, rewritten), _masked(compressed, rewritten)
    g0, g1 = m0.graph, m1.graph
    assert len(g0.node) == len(g1.node)
    for a, b in zip(g0.node, g1.node):
        assert a.SerializeToString() == b.SerializeToString(), f"node {a.name or a.op_type!r} changed"
    for field_name in ("input", "output", "value_info"):
        assert getattr(g0, field_name) == getattr(g1, field_name), field_name
    assert (g0.name, g0.doc_string) == (g1.name, g1.doc_string)
    assert original.opset_import == compressed.opset_import
    assert original.metadata_props == compressed.metadata_props
    assert (original.ir_version, original.producer_name, original.producer_version, original.domain) == (
        compressed.ir_version, compressed.producer_name, compressed.producer_version, compressed.domain)
    assert [t.name for t in original.graph.initializer] == [t.name for t in compressed.graph.initializer]
    for t0, t1 in zip(original.graph.initializer, compressed.graph.initializer):
        assert (list(t0.dims), t0.data_type, t0.doc_string) == (list(t1.dims), t1.data_type, t1.doc_string)
        if t0.name not in rewritten:
            np.testing.assert_array_equal(numpy_helper.to_array(t0), numpy_helper.to_array(t1))
