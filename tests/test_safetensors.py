"""Weights from a safetensors checkpoint substituted into an exported graph (names do not line up)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import save_file

from fls_compress.errors import InvalidDataError
from fls_compress.io.onnx_model import read_initializer_arrays
from fls_compress.io.safetensors_weights import apply_safetensors


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.ln = torch.nn.LayerNorm(5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


def test_state_dict_is_matched_by_name_shape_and_transpose(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    torch.onnx.export(net, (torch.randn(2, 4, 6),), tmp_path / "m.onnx", input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.load(tmp_path / "m.onnx")
    trained = Net().eval()  # different weights, as a fine-tuned checkpoint would have
    save_file({k: v.detach().numpy().copy() for k, v in trained.state_dict().items()}, tmp_path / "w.safetensors")
    new = apply_safetensors(model, tmp_path / "w.safetensors")
    x = torch.randn(2, 4, 6)
    import onnxruntime as ort

    y = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, trained(x).detach().numpy(), atol=1e-5)
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert read_initializer_arrays(model).keys() == read_initializer_arrays(new).keys()


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    torch.onnx.export(net, (torch.randn(2, 6),), tmp_path / "m.onnx", input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.load(tmp_path / "m.onnx")
    save_file({"something": np.ones((7, 7), np.float32)}, tmp_path / "bad.safetensors")
    with pytest.raises(InvalidDataError, match="cannot match tensor 'something'"):
        apply_safetensors(model, tmp_path / "bad.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidDataError, match="not a readable safetensors file"):
        apply_safetensors(model, tmp_path / "corrupt.safetensors")


class Square(torch.nn.Module):
    def __init__(self, d: int = 4):
        super().__init__()
        self.a = torch.nn.Linear(d, d)
        self.b = torch.nn.Linear(d, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("rank", [2, 3])
def test_square_linear_weights_are_oriented_by_their_graph_use(tmp_path, rank):
    """Linear(d, d) exported as MatMul (rank-3 input) or Gemm (rank-2 input, transB=1): a square weight
    must be transposed exactly when the graph stores it as [in, out]."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4) if rank == 3 else torch.randn(2, 4)
    torch.onnx.export(Square().eval(), (x,), tmp_path / "m.onnx", input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.load(tmp_path / "m.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert ("MatMul" in ops) if rank == 3 else ("Gemm" in ops)
    trained = Square().eval()
    state = {k: v.detach().numpy().copy() for k, v in trained.state_dict().items()}
    save_file({f"renamed.{k}": v for k, v in state.items()}, tmp_path / "w.safetensors")
    new = apply_safetensors(model, tmp_path / "w.safetensors")
    import onnxruntime as ort

    y = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, trained(x).detach().numpy(), atol=1e-5)


def test_square_weight_without_an_orienting_use_is_refused():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidDataError, match="is square and initializer 'w'"):
        from fls_compress.io.safetensors_weights import match_safetensors

        match_safetensors(model, {"fc.weight": np.ones((3, 3), np.float32)})
