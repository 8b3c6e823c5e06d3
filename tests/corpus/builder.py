"""Build, offline and in seconds, tiny ONNX models with the structures real exports have.

Each :class:`CorpusModel` records how the model was produced (``exporter``), which structure it
exercises (``family``), its file, and how to feed it: a calibration ``.npz`` and, where needed,
``shapes`` (sizes of dynamic dimensions) and ``consts`` (values of rank-0 inputs), the arguments of
:func:`fls_compress.io.calibration.load_calibration`.

* ``torchscript`` / ``dynamo``: ``torch.onnx.export(..., dynamo=False / True)`` of small modules
  (convnet with BatchNorm, LSTM, GRU, a transformer block with GELU + LayerNorm, a YOLO-style head);
* ``onnx.helper``: graphs written node by node the way paddle2onnx and other converters write them
  (every weight a ``Constant`` node, ``[-1, 3, ?, ?]`` inputs, a Reshape to a computed shape before
  BatchNorm), ``auto_pad=SAME_UPPER``, a rank-0 input switching an ``If``, float16 weights, and
  external-data storage.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

F32 = TensorProto.FLOAT


@dataclass
class CorpusModel:
    name: str
    exporter: str
    family: str
    path: Path
    data: Path
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    consts: dict[str, float] = field(default_factory=dict)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _export(module: nn.Module, args: tuple, path: Path, *, dynamo: bool, opset: int, names: list[str],
            outputs: list[str] | None = None, dynamic: dict | None = None, metadata: dict[str, str] | None = None) -> None:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs: dict = {"input_names": names, "opset_version": opset, "dynamo": dynamo}
        if outputs:
            kwargs["output_names"] = outputs
        if dynamic:
            kwargs["dynamic_axes"] = dynamic
        if dynamo:
            kwargs["external_data"] = False
            kwargs["verbose"] = False
        torch.onnx.export(module, args, str(path), **kwargs)
    model = onnx.load(str(path))
    if metadata:
        helper.set_model_props(model, metadata)
        onnx.save(model, str(path))


# ------------------------------------------------------------------------------------------------
# torch modules
# ------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """torchvision-style stem: Conv-BN-ReLU-MaxPool, Conv-BN-ReLU, GAP, Linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        )
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class RecurrentNet(nn.Module):
    """A CRNN-style sequence model: Linear -> LSTM or GRU -> Linear, on [batch, seq, features]."""

    def __init__(self, cell: str):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.rnn = (nn.LSTM if cell == "LSTM" else nn.GRU)(8, 8, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.rnn(torch.tanh(self.inp(x)))
        return self.out(y)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


class YoloStyle(nn.Module):
    """Backbone at strides 8/16 and a decoupled head emitting Ultralytics' [B, 4 + C, N] layout."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU(),
                                  nn.Conv2d(8, 12, 3, 2, 1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.SiLU())
        self.box = nn.ModuleList([nn.Conv2d(12, 4, 1), nn.Conv2d(16, 4, 1)])
        self.cls = nn.ModuleList([nn.Conv2d(12, classes, 1), nn.Conv2d(16, classes, 1)])

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down(p3)
        outs = []
        for feat, box, cls in zip((p3, p4), self.box, self.cls):
            b = box(feat).flatten(2)
            c = torch.sigmoid(cls(feat)).flatten(2)
            outs.append(torch.cat([b, c], 1))
        return torch.cat(outs, 2)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def build_cnn(out: Path, *, dynamo: bool, opset: int) -> CorpusModel:
    torch.manual_seed(0)
    net = SmallCNN()
    tag = f"cnn_{'dynamo' if dynamo else 'torchscript'}_op{opset}"
    x = torch.randn(2, 3, 16, 16)
    _export(net, (x,), out / f"{tag}.onnx", dynamo=dynamo, opset=opset, names=["input"],
            dynamic={"input": {0: "N"}})
    data = _save_npz(out / f"{tag}.npz", input=_rng(1).standard_normal((24, 3, 16, 16)).astype(np.float32))
    return CorpusModel(tag, "dynamo" if dynamo else "torchscript", "Conv+BatchNorm+MaxPool+Gemm", out / f"{tag}.onnx", data)


def build_recurrent(out: Path, cell: str) -> CorpusModel:
    torch.manual_seed(0)
    tag = f"{cell.lower()}_torchscript_op14"
    _export(RecurrentNet(cell), (torch.randn(2, 5, 6),), out / f"{tag}.onnx", dynamo=False, opset=14, names=["x"],
            dynamic={"x": {0: "N", 1: "T"}})
    data = _save_npz(out / f"{tag}.npz", x=_rng(2).standard_normal((24, 5, 6)).astype(np.float32))
    return CorpusModel(tag, "torchscript", cell, out / f"{tag}.onnx", data)


def build_transformer(out: Path, *, dynamo: bool, opset: int) -> CorpusModel:
    torch.manual_seed(0)
    tag = f"transformer_{'dynamo' if dynamo else 'torchscript'}_op{opset}"
    _export(TinyTransformer(), (torch.randn(2, 6, 16),), out / f"{tag}.onnx", dynamo=dynamo, opset=opset, names=["x"],
            dynamic={"x": {0: "N"}})
    data = _save_npz(out / f"{tag}.npz", x=_rng(3).standard_normal((24, 6, 16)).astype(np.float32))
    return CorpusModel(tag, "dynamo" if dynamo else "torchscript", "MatMul+LayerNorm+GELU+Softmax", out / f"{tag}.onnx", data)


def build_yolo(out: Path) -> CorpusModel:
    torch.manual_seed(0)
    tag = "yolo_head_torchscript_op17"
    meta = {"task": "detect", "names": "{0: 'a', 1: 'b', 2: 'c'}", "stride": "16", "author": "Ultralytics-style"}
    _export(YoloStyle(), (torch.randn(1, 3, 64, 64),), out / f"{tag}.onnx", dynamo=False, opset=17, names=["images"],
            outputs=["output0"], dynamic={"images": {0: "batch", 2: "height", 3: "width"}}, metadata=meta)
    data = _save_npz(out / f"{tag}.npz", images=_rng(4).random((12, 3, 64, 64)).astype(np.float32))
    return CorpusModel(tag, "torchscript", "detector head [B,4+C,N] + metadata task=detect", out / f"{tag}.onnx", data,
                       shapes={"images": (1, 3, 64, 64)})


def _const(name: str, arr: np.ndarray, index: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"p2o.Constant.{index}", value=numpy_helper.from_array(arr, ""))


def build_paddle_constants(out: Path) -> CorpusModel:
    """paddle2onnx-style: every weight a Constant, input [-1, 3, -1, -1], BatchNorm after a Reshape
    whose target is computed from Shape (so ONNX shape inference loses the rank)."""
    rng = _rng(5)
    c = 6
    consts = [
        _const("conv_w", (rng.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), 0),
        _const("conv_b", np.zeros(c, np.float32), 1),
        _const("bn_s", np.ones(c, np.float32), 2), _const("bn_b", np.zeros(c, np.float32), 3),
        _const("bn_m", np.zeros(c, np.float32), 4), _const("bn_v", np.ones(c, np.float32), 5),
        _const("zero", np.array([0], np.int64), 6), _const("one", np.array([1], np.int64), 7),
        _const("tail", np.array([-1], np.int64), 8),
        _const("fc_w", (rng.standard_normal((c, 4)) * 0.3).astype(np.float32), 9),
        _const("fc_b", np.zeros(4, np.float32), 10),
    ]
    nodes = consts + [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv2d_0", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"], name="shape_0"),
        helper.make_node("Add", ["one", "one"], ["two"], name="add_0"),
        helper.make_node("Slice", ["s", "zero", "two"], ["nc"], name="slice_0"),
        helper.make_node("Concat", ["nc", "tail"], ["target"], name="concat_0", axis=0),
        helper.make_node("Reshape", ["c", "target"], ["r"], name="reshape_0"),
        helper.make_node("BatchNormalization", ["r", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn_0"),
        helper.make_node("Relu", ["bn"], ["act"], name="relu_0"),
        helper.make_node("ReduceMean", ["act"], ["pool"], name="mean_0", axes=[2], keepdims=0),
        helper.make_node("MatMul", ["pool", "fc_w"], ["mm"], name="matmul_0"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="add_1"),
    ]
    graph = helper.make_graph(nodes, "paddle_cls", [helper.make_tensor_value_info("x", F32, [-1, 3, -1, -1])],
                              [helper.make_tensor_value_info("logits", F32, [-1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="PaddlePaddle")
    onnx.checker.check_model(model)
    path = out / "paddle_constants_op13.onnx"
    onnx.save(model, str(path))
    data = _save_npz(out / "paddle_constants.npz", x=_rng(6).standard_normal((16, 3, 12, 20)).astype(np.float32))
    return CorpusModel("paddle_constants_op13", "onnx.helper (paddle2onnx-style)", "Constant-node weights, [-1,3,?,?], BN after computed Reshape", path, data)


def build_same_upper(out: Path) -> CorpusModel:
    rng = _rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], auto_pad="SAME_UPPER", kernel_shape=[4, 4]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["b"], auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["b"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (6, 2, 4, 4)), ("w2", (8, 6, 3, 3)), ("w3", (3, 8)))]
    graph = helper.make_graph(nodes, "same", [helper.make_tensor_value_info("x", F32, ["N", 2, 9, 9])],
                              [helper.make_tensor_value_info("y", F32, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    path = out / "same_upper_op11.onnx"
    onnx.save(model, str(path))
    data = _save_npz(out / "same_upper.npz", x=_rng(8).standard_normal((16, 2, 9, 9)).astype(np.float32))
    return CorpusModel("same_upper_op11", "onnx.helper", "Conv auto_pad=SAME_UPPER (even kernel)", path, data)


def build_scalar_if(out: Path) -> CorpusModel:
    """A Silero-VAD-style graph: data ``x [N, 10]``, recurrent ``state [2, N, 12]`` (batch on axis 1),
    and a rank-0 int64 ``sr`` selecting a branch with ``If(sr == 16000)``; outputs ``prob`` and
    ``stateN [2, N, 12]``."""
    rng = _rng(9)

    def branch(name: str, weight: str) -> onnx.GraphProto:
        """A body holding its own weight (as silero_vad.onnx does)."""
        w = numpy_helper.from_array((rng.standard_normal((12, 12)) * 0.4).astype(np.float32), weight)
        return helper.make_graph([helper.make_node("MatMul", ["h", weight], [name])], name, [],
                                 [helper.make_tensor_value_info(name, F32, None)], [w])

    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"]),
        helper.make_node("ReduceMean", ["state"], ["s"], axes=[0], keepdims=0),
        helper.make_node("Add", ["h0", "s"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h"]),
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["z"], name="sr_switch", then_branch=branch("t", "w16"), else_branch=branch("e", "w8")),
        helper.make_node("Relu", ["z"], ["zr"]),
        helper.make_node("MatMul", ["zr", "w_out"], ["prob_logits"]),
        helper.make_node("Sigmoid", ["prob_logits"], ["prob"]),
        helper.make_node("Unsqueeze", ["zr", "zero_axis"], ["zu"]),
        helper.make_node("Concat", ["zu", "zu"], ["stateN"], axis=0),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
             for n, s in (("w_in", (10, 12)), ("w_out", (12, 2)))]
    inits += [numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
              numpy_helper.from_array(np.array([0], np.int64), "zero_axis")]
    graph = helper.make_graph(nodes, "vad", [helper.make_tensor_value_info("x", F32, ["N", 10]),
                                             helper.make_tensor_value_info("state", F32, [2, "N", 12]),
                                             helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("prob", F32, ["N", 2]),
                               helper.make_tensor_value_info("stateN", F32, [2, "N", 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    path = out / "scalar_if_op16.onnx"
    onnx.save(model, str(path))
    data = _save_npz(out / "scalar_if.npz", x=_rng(10).standard_normal((24, 10)).astype(np.float32),
                     state=_rng(11).standard_normal((2, 24, 12)).astype(np.float32) * 0.1)
    return CorpusModel("scalar_if_op16", "onnx.helper (VAD-style)", "rank-0 input + If on it (weights in branches) + state [2,N,H]", path,
                       data, consts={"sr": 16000})


def build_fp16(out: Path) -> CorpusModel:
    rng = _rng(11)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((12, 16)) * 0.3).astype(np.float16), "w1"),
        numpy_helper.from_array(np.zeros(16, np.float16), "b1"),
        numpy_helper.from_array((rng.standard_normal((4, 16)) * 0.3).astype(np.float16), "w2"),
    ]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = out / "fp16_mlp_op17.onnx"
    onnx.save(model, str(path))
    data = _save_npz(out / "fp16.npz", x=_rng(12).standard_normal((24, 12)).astype(np.float32))
    return CorpusModel("fp16_mlp_op17", "onnx.helper", "float16 weights and I/O", path, data)


def build_external(out: Path) -> CorpusModel:
    base = build_cnn(out, dynamo=False, opset=17)
    model = onnx.load(str(base.path))
    ext_dir = out / "external"
    ext_dir.mkdir(exist_ok=True)
    path = ext_dir / "cnn_external.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="cnn_external.onnx.data", size_threshold=0)
    return CorpusModel("cnn_external_data", "torchscript + external data", "external-data tensors", path, base.data)


BUILDERS: dict[str, Callable[[Path], CorpusModel]] = {
    "cnn_torchscript_op13": lambda out: build_cnn(out, dynamo=False, opset=13),
    "cnn_torchscript_op17": lambda out: build_cnn(out, dynamo=False, opset=17),
    "cnn_dynamo_op18": lambda out: build_cnn(out, dynamo=True, opset=18),
    "paddle_constants_op13": build_paddle_constants,
    "same_upper_op11": build_same_upper,
    "scalar_if_op16": build_scalar_if,
    "lstm_torchscript_op14": lambda out: build_recurrent(out, "LSTM"),
    "gru_torchscript_op14": lambda out: build_recurrent(out, "GRU"),
    "yolo_head_torchscript_op17": build_yolo,
    "transformer_torchscript_op17": lambda out: build_transformer(out, dynamo=False, opset=17),
    "transformer_dynamo_op20": lambda out: build_transformer(out, dynamo=True, opset=20),
    "fp16_mlp_op17": build_fp16,
    "cnn_external_data": build_external,
}


def build(name: str, out: Path) -> CorpusModel:
    """Build corpus model ``name`` into directory ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    return BUILDERS[name](out)
