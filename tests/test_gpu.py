"""FLS on a CUDA device: the same job as on the CPU, checked against the CPU run as the reference.

The Fisher statistics, the FishLeg fit and the OBS updates run on the GPU (``RunOptions.device``);
onnxruntime verification stays on the CPU. GPU arithmetic (reduction order, TF32/bf16 matmuls in the
fit) differs from the CPU's, so the reference comparison allows what that rounding can move: the exact
target counts are equal, the selected weights overlap almost entirely and the final models agree on
held-out inputs. Skipped (with the reason) where torch sees no CUDA device: CI has none.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fls_compress import FLSConfig, RunOptions, compress
from fls_compress.configs import FLSQuantConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """Conv(1->8, 3x3) -> ReLU -> Conv(8->16, 3x3) -> ReLU -> Flatten -> Gemm(16*6*6 -> 10), legacy export."""
    d = tmp_path_factory.mktemp("gpu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10)).eval()
    x = torch.randn(512, 1, 10, 10)
    with torch.no_grad():
        labels = net(x).argmax(1).numpy()
    torch.onnx.export(net, (x[:2],), d / "cnn.onnx", input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17, dynamo=False)
    np.savez(d / "calib.npz", x=x[:384].numpy(), labels=labels[:384])
    np.savez(d / "held.npz", x=x[384:].numpy(), labels=labels[384:])
    return d


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("weight")}


def _run(cnn, config, device: str) -> dict:
    opts = RunOptions(seed=0, progress=False, device=device, latency=False)
    return compress(cnn / "cnn.onnx", config, cnn / "calib.npz", eval_data=cnn / "held.npz", options=opts)


def test_fls_prune_on_cuda_matches_the_cpu_run(cnn):
    config = FLSConfig(sparsity=0.5, fit_steps=40, refit_steps=10)
    gpu, cpu = _run(cnn, config, "cuda"), _run(cnn, config, "cpu")
    assert gpu["device"] == "cuda" and cpu["device"] == "cpu"
    wg, wc = _weights(gpu.model), _weights(cpu.model)
    zeros_g = sum(int((w == 0).sum()) for w in wg.values())
    zeros_c = sum(int((w == 0).sum()) for w in wc.values())
    assert zeros_g == zeros_c  # the global target is a count: exactly the same on both devices
    kept_g = np.concatenate([(w != 0).ravel() for w in wg.values()])
    kept_c = np.concatenate([(w != 0).ravel() for w in wc.values()])
    overlap = float((kept_g & kept_c).sum() / kept_c.sum())
    assert overlap >= 0.95, overlap
    agree_g = next(iter(gpu["verification"]["outputs"].values()))["top1_agreement"]
    agree_c = next(iter(cpu["verification"]["outputs"].values()))["top1_agreement"]
    assert abs(agree_g - agree_c) <= 0.05, (agree_g, agree_c)


def test_fls_quantize_on_cuda_matches_the_cpu_run(cnn):
    config = FLSQuantConfig(bits=8, fit_steps=40)
    gpu, cpu = _run(cnn, config, "cuda"), _run(cnn, config, "cpu")
    assert gpu["device"] == "cuda"
    codes_g = {t.name: numpy_helper.to_array(t) for t in gpu.model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    codes_c = {t.name: numpy_helper.to_array(t) for t in cpu.model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert codes_g.keys() == codes_c.keys() and codes_g
    steps = np.concatenate([np.abs(codes_g[k].astype(np.int32) - codes_c[k].astype(np.int32)).ravel() for k in codes_c])
    assert float((steps <= 1).mean()) >= 0.99 and float((steps == 0).mean()) >= 0.9, (steps.max(), float((steps == 0).mean()))
    agree = [next(iter(r["verification"]["outputs"].values()))["top1_agreement"] for r in (gpu, cpu)]
    assert min(agree) >= 0.95 and abs(agree[0] - agree[1]) <= 0.03, agree
