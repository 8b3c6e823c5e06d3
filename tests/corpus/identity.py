"""Assert that a compressed model is its original with only the pruned weight payloads changed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def assert_same_graph_except(original: onnx.ModelProto, compressed: onnx.ModelProto, rewritten: set[str]) -> None:
    """Nodes, names, attributes, graph I/O, value_info, opsets, IR version, producer and metadata
    are identical; initializers not in ``rewritten`` hold identical arrays; a Constant node producing
    a rewritten weight differs only in its ``value`` payload (same dims and dtype)."""
    g0, g1 = original.graph, compressed.graph
    assert len(g0.node) == len(g1.node)
    for a, b in zip(g0.node, g1.node):
        if a.op_type == "Constant" and a.output and a.output[0] in rewritten:
            assert (a.name, list(a.input), list(a.output), a.domain) == (b.name, list(b.input), list(b.output), b.domain)
            assert [x.name for x in a.attribute] == [x.name for x in b.attribute] == ["value"]
            assert list(a.attribute[0].t.dims) == list(b.attribute[0].t.dims)
            assert a.attribute[0].t.data_type == b.attribute[0].t.data_type
        else:
            assert a.SerializeToString() == b.SerializeToString(), f"node {a.name!r} changed"
    for field_name in ("input", "output", "value_info"):
        assert getattr(g0, field_name) == getattr(g1, field_name), field_name
    assert (g0.name, g0.doc_string) == (g1.name, g1.doc_string)
    assert original.opset_import == compressed.opset_import
    assert original.metadata_props == compressed.metadata_props
    assert (original.ir_version, original.producer_name, original.producer_version, original.domain) == (
        compressed.ir_version, compressed.producer_name, compressed.producer_version, compressed.domain)
    names0 = [t.name for t in g0.initializer]
    names1 = [t.name for t in g1.initializer]
    assert names0 == names1
    for t0, t1 in zip(g0.initializer, g1.initializer):
        assert (list(t0.dims), t0.data_type, t0.doc_string) == (list(t1.dims), t1.data_type, t1.doc_string)
        if t0.name not in rewritten:
            np.testing.assert_array_equal(numpy_helper.to_array(t0), numpy_helper.to_array(t1))
