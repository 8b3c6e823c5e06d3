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
