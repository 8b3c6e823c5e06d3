"""``quantize`` through ``compress()``: int8 keeps the classifier, int4 OBS methods beat round-to-nearest,
joint pruning stays exact, and the report carries sizes, latency and a plain speed note."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from fls_compress import FLSQuantConfig, GPTQConfig, RTNConfig, RunOptions, compress
from fls_compress.configs.pruning import DEFAULT_MAX_ROWS
from fls_compress.configs.quantize import GPTQ_ROWS_8BIT
from fls_compress.errors import InvalidOptionError, UnsupportedModelError

from .models import small_cnn

RUN = RunOptions(progress=False, num_calibration=256, seed=0)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return small_cnn(tmp_path_factory.mktemp("qcnn"))


def _quantize(cnn, config, out):
    return compress(cnn["model"], config, cnn["calib"], output=out, eval_data=cnn["test"], options=RUN)


def test_int8_keeps_the_classifier_and_shrinks_the_file(cnn, tmp_path):
    rep = _quantize(cnn, GPTQConfig(bits=8), tmp_path / "q8.onnx")
    out = rep["verification"]["outputs"]["logits"]
    assert out["top1_agreement"] >= 0.99
    assert abs(out["accuracy_compressed"] - out["accuracy_original"]) <= 0.005
    assert rep["method_info"]["max_rows_per_layer"] == GPTQ_ROWS_8BIT  # 8-bit, no pruning: the smaller default
    q = rep["quantization"]
    assert q["size_bytes"]["quantized"] < 0.35 * q["size_bytes"]["original"]  # int8 codes as raw bytes
    lat = rep["latency"]
    assert lat["batches"][0]["original"]["median_ms"] > 0 and lat["providers"][0] == "CPUExecutionProvider"
    assert q["speed_note"].startswith(lat["verdict"]) and rep["notes"] == [q["speed_note"]]
    model = onnx.load(tmp_path / "q8.onnx")
    onnx.checker.check_model(model)
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_int4_obs_methods_lose_less_than_round_to_nearest(cnn, tmp_path):
    errors = {}
    for name, config in {"rtn": RTNConfig(bits=4), "gptq": GPTQConfig(bits=4),
                         "fls": FLSQuantConfig(bits=4, fit_steps=10, moment_samples=64)}.items():
        rep = _quantize(cnn, config, tmp_path / f"{name}.onnx")
        errors[name] = rep["verification"]["outputs"]["logits"]["relative_l2_error"]
        if name == "gptq":
            assert rep["method_info"]["max_rows_per_layer"] == DEFAULT_MAX_ROWS
    assert errors["gptq"] < errors["rtn"] and errors["fls"] < errors["rtn"], errors


def test_sparse_and_quantized_in_one_sweep_keeps_pruned_weights_zero(cnn, tmp_path):
    out = tmp_path / "sq.onnx"
    rep = _quantize(cnn, GPTQConfig(bits=8, sparsity=0.5), out)
    assert rep["sparsity"]["achieved"] >= 0.5 - 1e-3
    assert rep["method_info"]["max_rows_per_layer"] == DEFAULT_MAX_ROWS  # pruning keeps the full default
    model = onnx.load(out)
    # dequantize every weight with onnxruntime itself: zeros stay exactly zero
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(dq, "dq", [], [onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in dq],
                               list(model.graph.initializer)),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    weights = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    assert zeros / total >= 0.5 - 1e-3


@pytest.mark.parametrize("config, rows", [
    (GPTQConfig(bits=8), GPTQ_ROWS_8BIT),
    (GPTQConfig(bits=4), DEFAULT_MAX_ROWS),
    (GPTQConfig(bits=8, pattern="2:4"), DEFAULT_MAX_ROWS),
    (GPTQConfig(bits=8, max_rows_per_layer=1000), 1000),
    (GPTQConfig(bits=4, max_rows_per_layer=1 << 40), 1 << 40),
])
def test_gptq_rows_per_layer_default_follows_bits_and_pruning(config, rows):
    assert config.rows_per_layer == rows


@pytest.mark.parametrize("config, error, fragment", [
    (lambda: GPTQConfig(bits=5), InvalidOptionError, "--bits must be 4 or 8"),
    (lambda: GPTQConfig(bits=3), InvalidOptionError, "--bits must be >= 4"),
    (lambda: GPTQConfig(granularity="per-row"), InvalidOptionError, "--granularity"),
    (lambda: GPTQConfig(exclude=("*",)), InvalidOptionError, "matches every quantizable weight"),
])
def test_bad_quantize_options_are_refused(cnn, tmp_path, config, error, fragment):
    with pytest.raises(error, match=fragment):
        _quantize(cnn, config(), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_already_quantized_models_are_refused(cnn, tmp_path):
    _quantize(cnn, RTNConfig(bits=8), tmp_path / "q.onnx")
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        compress(tmp_path / "q.onnx", RTNConfig(), cnn["calib"], output=tmp_path / "qq.onnx", options=RUN)
