"""Small composite ONNX models built with ``onnx.helper`` around operators onnx2torch lacks, for the
end-to-end tests of the converter package (prune with ``fls``, write back, verify with onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _save(nodes, inputs, outputs, inits: dict[str, np.ndarray], opset: int, path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def byte_classifier(path: Path, rng: np.random.Generator) -> Path:
    """A tf2onnx-style sequence classifier: Conv1d -> Relu -> GlobalMaxPool -> Flatten -> Gemm."""
    inits = {"w_conv": rng.normal(0, 0.5, (16, 4, 3)).astype(np.float32), "b_conv": np.zeros(16, np.float32),
             "w_fc": rng.normal(0, 0.3, (16, 5)).astype(np.float32), "b_fc": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w_conv", "b_conv"], ["c"], name="conv", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalMaxPool", ["r"], ["p"], name="gmp"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["logits"], name="fc")]
    return _save(nodes, [helper.make_tensor_value_info("x", F, ["n", 4, 20])],
                 [helper.make_tensor_value_info("logits", F, ["n", 5])], inits, 17, path)


def attention_block(path: Path, rng: np.random.Generator, d: int = 16, heads: int = 2) -> Path:
    """An opset-23 transformer block: Q/K/V projections -> Attention (3-D, causal) -> output projection
    -> residual -> LayerNormalization -> MatMul -> Gelu -> MatMul."""
    s = 1 / np.sqrt(d)
    inits = {n: rng.normal(0, s, (d, d)).astype(np.float32) for n in ("wq", "wk", "wv", "wo")}
    inits.update(w1=rng.normal(0, s, (d, 2 * d)).astype(np.float32), w2=rng.normal(0, s / 1.4, (2 * d, d)).astype(np.float32),
                 ln_s=np.ones(d, np.float32), ln_b=np.zeros(d, np.float32))
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], name="attn", q_num_heads=heads, kv_num_heads=heads,
                              is_causal=1),
             helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
             helper.make_node("Add", ["x", "o"], ["res"], name="residual"),
             helper.make_node("LayerNormalization", ["res", "ln_s", "ln_b"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w1"], ["h"], name="fc1"),
             helper.make_node("Gelu", ["h"], ["g"], name="gelu"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2")]
    return _save(nodes, [helper.make_tensor_value_info("x", F, ["n", 6, d])],
                 [helper.make_tensor_value_info("y", F, ["n", 6, d])], inits, 23, path)


def groupnorm_mish_cnn(path: Path, rng: np.random.Generator) -> Path:
    """Conv -> GroupNormalization (opset 21, per-channel scale) -> Mish -> Conv -> GlobalAveragePool -> Gemm."""
    inits = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "gn_s": rng.uniform(0.5, 1.5, 8).astype(np.float32),
             "gn_b": rng.normal(0, 0.1, 8).astype(np.float32), "w2": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32),
             "w_fc": rng.normal(0, 0.3, (4, 8)).astype(np.float32), "b_fc": np.zeros(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["c1", "gn_s", "gn_b"], ["gn"], name="gn", num_groups=2),
             helper.make_node("Mish", ["gn"], ["m"], name="mish"),
             helper.make_node("Conv", ["m", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w_fc", "b_fc"], ["logits"], name="fc", transB=1)]
    return _save(nodes, [helper.make_tensor_value_info("x", F, ["n", 3, 8, 8])],
                 [helper.make_tensor_value_info("logits", F, ["n", 4])], inits, 21, path)


def saturated_sigmoid(path: Path, rng: np.random.Generator) -> Path:
    """MatMul -> Add(-16) -> Sigmoid: pre-activations around -16, in onnxruntime's approximate Sigmoid
    tail (below -16 it returns 0), the PP-OCRv4 det situation on synthetic data."""
    inits = {"w": rng.normal(0, 0.5, (8, 4)).astype(np.float32), "shift": np.full(4, -16.0, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "shift"], ["z"], name="shift"),
             helper.make_node("Sigmoid", ["z"], ["y"], name="sig")]
    return _save(nodes, [helper.make_tensor_value_info("x", F, ["n", 8])],
                 [helper.make_tensor_value_info("y", F, ["n", 4])], inits, 17, path)
