"""End to end with the converter package: ``fls`` prunes models built around operators onnx2torch
lacks (GlobalMaxPool; Gelu + LayerNormalization + opset-23 Attention; GroupNormalization + Mish),
writes the weights back into the original graph and verifies the result with onnxruntime; the
conversion gate refuses a torch graph that departs from onnxruntime and explains one whose only
departure is onnxruntime's own kernel."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx2torch.node_converters import registry

from fls_compress import FLSConfig, RunOptions, compress
from fls_compress.bridge.compat import install_compat
from fls_compress.errors import UnsupportedModelError
from fls_compress.io.onnx_model import load_onnx

from .op_models import attention_block, byte_classifier, groupnorm_mish_cnn, saturated_sigmoid

QUIET = RunOptions(progress=False, seed=0)
FAST = dict(sparsity=0.5, fit_steps=10, refit_steps=4, batch_size=16, moment_samples=16, steps=2)


def _data(path, shape, rng, n=48):
    np.savez(path, x=rng.normal(size=(n, *shape)).astype(np.float32))
    return path


@pytest.mark.parametrize("build,shape,ops", [
    (byte_classifier, (4, 20), {"GlobalMaxPool"}),
    (attention_block, (6, 16), {"Attention", "Gelu", "LayerNormalization"}),
    (groupnorm_mish_cnn, (3, 8, 8), {"GroupNormalization", "Mish"}),
])
def test_fls_prunes_models_with_own_converters(tmp_path, build, shape, ops):
    rng = np.random.default_rng(0)
    model_path = build(tmp_path / "m.onnx", rng)
    original = load_onnx(model_path)
    assert ops <= {n.op_type for n in original.graph.node}
    data = _data(tmp_path / "d.npz", shape, rng)
    out = tmp_path / "pruned.onnx"
    report = compress(model_path, FLSConfig(**FAST), data, output=out, options=QUIET)
    assert report["status"] == "ok"
    assert report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.02)
    conversion = report["conversion"]
    assert conversion["max_rel_error_vs_onnxruntime"] < 1e-4  # the torch graph the Fisher used is faithful
    assert "mismatch_allowed" not in conversion
    written = load_onnx(out)
    assert [n.SerializeToString() for n in written.graph.node] == [n.SerializeToString() for n in original.graph.node]
    for name, layer in report["sparsity"]["per_layer"].items():  # global selection: every layer pruned, unevenly
        assert 0.0 < layer["sparsity"] < 1.0, name
    x = np.load(data)["x"][:8]
    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == ref.shape and np.isfinite(got).all() and not np.allclose(got, ref)  # pruned, still runs
    assert all(np.isfinite(v["cosine_similarity"]) for v in report["verification"]["outputs"].values())


def test_onnxruntime_kernel_deviation_is_explained_not_fatal(tmp_path, caplog):
    """Every Sigmoid input below -16: onnxruntime's approximate kernel returns 0 there, the converted
    graph the exact value; the gate names the node, says which side matches the spec, and continues."""
    rng = np.random.default_rng(1)
    model_path = saturated_sigmoid(tmp_path / "m.onnx", rng)
    data = _data(tmp_path / "d.npz", (8,), rng)
    report = compress(model_path, FLSConfig(**FAST), data, output=tmp_path / "o.onnx", options=QUIET)
    conversion = report["conversion"]
    assert conversion["max_rel_error_vs_onnxruntime"] > 1e-2 and conversion["faithful"] is True
    (deviation,) = conversion["onnxruntime_kernel_deviations"]
    assert deviation["node"] == "sig" and deviation["op_type"] == "Sigmoid"
    assert deviation["torch_vs_spec"] < 1e-5 < 1e-3 < deviation["onnxruntime_vs_spec"]
    assert any("onnxruntime's kernel departs from the exact spec value" in w for w in report["warnings"])


@pytest.fixture
def wrong_gelu():
    """A deliberately wrong Gelu converter (a ReLU), installed through onnx2torch's registry: what a
    buggy converter does. Restored afterwards."""
    install_compat()
    key = registry.OperationDescription(domain="", operation_type="Gelu", version=20)
    saved = registry._CONVERTER_REGISTRY[key]

    def convert(node, graph):
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

        return OperationConverterResult(torch.nn.ReLU(), onnx_mapping_from_node(node))

    registry._CONVERTER_REGISTRY[key] = convert
    yield
    registry._CONVERTER_REGISTRY[key] = saved


def _gelu_model(tmp_path, rng):
    from onnx import TensorProto, helper, numpy_helper

    w = rng.normal(0, 2.0, (8, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Gelu", ["h"], ["g"], name="the_gelu"),
                               helper.make_node("MatMul", ["g", "w"], ["y"], name="mm2")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "gelu.onnx")
    return tmp_path / "gelu.onnx"


def test_diverging_conversion_stops_naming_the_node_unless_allowed(tmp_path, wrong_gelu):
    rng = np.random.default_rng(2)
    model_path = _gelu_model(tmp_path, rng)
    data = _data(tmp_path / "d.npz", (8,), rng)
    with pytest.raises(UnsupportedModelError, match=r"Gelu node 'the_gelu'") as info:
        compress(model_path, FLSConfig(**FAST), data, output=tmp_path / "o.onnx", options=QUIET)
    assert "--allow-conversion-mismatch" in str(info.value) and not (tmp_path / "o.onnx").exists()
    assert info.value.report["exit_code"] == 4
    # a looser tolerance accepts it silently (the measured error is below it), an override keeps it loudly
    report = compress(model_path, FLSConfig(**FAST), data, output=tmp_path / "o.onnx",
                      options=RunOptions(progress=False, allow_conversion_mismatch=True))
    conversion = report["conversion"]
    error = conversion["max_rel_error_vs_onnxruntime"]
    assert conversion["mismatch_allowed"] is True and conversion["faithful"] is False
    assert conversion["first_diverging_node"]["node"] == "the_gelu"
    assert conversion["first_diverging_node"]["torch_vs_spec"] > 1e-3
    assert any("used anyway" in w for w in report["warnings"])
    loose = compress(model_path, FLSConfig(**FAST), data, output=tmp_path / "o2.onnx",
                     options=RunOptions(progress=False, conversion_tol=2 * error))
    assert "mismatch_allowed" not in loose["conversion"] and loose["conversion"]["conversion_tol"] == 2 * error


def test_cli_exit_4_on_diverging_conversion(tmp_path, wrong_gelu, capsys):
    from cli.main import run

    rng = np.random.default_rng(3)
    model_path = _gelu_model(tmp_path, rng)
    data = _data(tmp_path / "d.npz", (8,), rng)
    with pytest.raises(SystemExit) as info:
        run(["prune", str(model_path), "-s", "0.5", "-o", str(tmp_path / "o.onnx"), "--data", str(data),
             "--fit-steps", "5", "--no-progress", "--conversion-tol", "1e-3"])
    assert info.value.code == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "the_gelu" in err[-1]


def test_cuda_request_without_cuda_ep_falls_back_to_cpu_with_a_warning(caplog):
    """``--device cuda`` asks onnxruntime for its CUDA execution provider; where it is missing or
    cannot start (this CPU-only onnxruntime), verification and capture use the CPU provider, a
    warning says so and the report section names the reason."""
    import logging

    from fls_compress.io.activations import ort_session
    from fls_compress.runtime import choose_ort_providers, session_providers

    try:
        with caplog.at_level(logging.WARNING, logger="fls_compress"):
            section = choose_ort_providers("cuda")
        if "CUDAExecutionProvider" in ort.get_available_providers() and section["fallback"] is None:
            assert section["providers"][0] == "CUDAExecutionProvider"
            return
        assert section == {"device": "cuda", "providers": ["CPUExecutionProvider"], "fallback": section["fallback"]}
        assert "CUDAExecutionProvider" in section["fallback"]
        assert any("verification and activation capture run on CPUExecutionProvider" in r.message for r in caplog.records)
        model = saturated_sigmoid_model_proto()
        assert ort_session(model).get_providers() == ["CPUExecutionProvider"]
    finally:
        choose_ort_providers("cpu")
    assert session_providers() == ["CPUExecutionProvider"]


def saturated_sigmoid_model_proto() -> onnx.ModelProto:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return load_onnx(saturated_sigmoid(Path(tmp) / "m.onnx", np.random.default_rng(0)))


def test_report_names_the_onnxruntime_providers(tmp_path):
    rng = np.random.default_rng(4)
    model_path = byte_classifier(tmp_path / "m.onnx", rng)
    data = _data(tmp_path / "d.npz", (4, 20), rng)
    from fls_compress import MagnitudeConfig

    report = compress(model_path, MagnitudeConfig(sparsity=0.5), data, output=tmp_path / "o.onnx", options=QUIET)
    assert report["onnxruntime"] == {"device": "cpu", "providers": ["CPUExecutionProvider"], "fallback": None}


def test_inspect_says_who_converts_each_operator(tmp_path, capsys):
    from cli.main import run

    model_path = attention_block(tmp_path / "m.onnx", np.random.default_rng(5))
    with pytest.raises(SystemExit) as info:
        run(["inspect", str(model_path)])
    assert info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unsupported_ops"] == []
    assert report["converters"] == {
        "MatMul (opset 13)": "onnx2torch", "Attention (opset 23)": "fls_compress (ops.attention)",
        "Add (opset 14)": "onnx2torch", "LayerNormalization (opset 17)": "onnx2torch", "Gelu (opset 20)": "fls_compress (compat)",
    }


def test_coverage_table_lists_every_schema_operator_with_a_verdict():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("op_coverage", Path(__file__).parents[1] / "scripts" / "op_coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.build(23)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    ops = {r.split(" | ")[0][2:] for r in rows}
    expected = {s.name for s in onnx.defs.get_all_schemas_with_history()
                if s.domain == "" and not s.deprecated and s.since_version <= 23}
    assert ops == expected
    verdicts = [r.split(" | ")[5] for r in rows]
    assert all(v.startswith(("onnx2torch", "compat", "ours", "refused: ")) for v in verdicts)
    assert "| GlobalMaxPool |" in table and "ours (pooling)" in table


def test_fls_prunes_a_dynamo_export_with_opset23_attention_and_rmsnorm(tmp_path):
    """torch's dynamo exporter at opset 23 emits Attention and RMSNormalization for a pre-norm
    transformer block (F.scaled_dot_product_attention, nn.RMSNorm): the real composite prunes end to end."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int = 16, heads: int = 2):
            super().__init__()
            self.heads = heads
            self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                       for z in self.qkv(self.norm1(x)).split(d, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.out(a)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    torch.manual_seed(0)
    program = torch.onnx.export(Block().eval(), (torch.randn(2, 6, 16),), dynamo=True, opset_version=23,
                                dynamic_shapes={"x": {0: "n"}})
    program.save(str(tmp_path / "block.onnx"))
    model = load_onnx(tmp_path / "block.onnx")
    assert {"Attention", "RMSNormalization"} <= {n.op_type for n in model.graph.node}
    data = _data(tmp_path / "d.npz", (6, 16), np.random.default_rng(6))
    report = compress(tmp_path / "block.onnx", FLSConfig(**FAST), data, output=tmp_path / "o.onnx", options=QUIET)
    assert report["status"] == "ok" and report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.02)
    assert report["conversion"]["max_rel_error_vs_onnxruntime"] < 1e-5
    (out,) = report["verification"]["outputs"].values()
    assert out["cosine_similarity"] > 0.9
