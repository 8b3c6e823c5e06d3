"""One-node ONNX test cases for the converter package (``fls_compress.bridge.ops``).

Each :class:`OpCase` is one operator, opset and attribute combination with random inputs; the tests
(``tests/test_ops.py``) convert the node with the bridge and compare against onnxruntime, and
``scripts/op_coverage.py`` lists the tested combinations per operator from the same table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(21)


def rand(*shape: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    if low is not None:
        return RNG.uniform(low, high, size=shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


@dataclass
class OpCase:
    """``inputs`` are graph inputs (fed at run time), ``consts`` initializers; ``None`` in ``order``
    is an omitted optional input. ``outputs`` are (name, element type) pairs."""

    op: str
    opset: int
    inputs: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str | None] | None = None
    outputs: list[tuple[str, int]] = field(default_factory=lambda: [("y", TensorProto.FLOAT)])
    grad: tuple[str, ...] = ()  # inputs whose gradients are checked (gradcheck in float64)
    #: why onnx.reference (the spec's reference implementation) is the reference instead of onnxruntime
    onnx_reference: str | None = None

    @property
    def id(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        shapes = ",".join("x".join(str(d) for d in a.shape) for a in self.inputs.values())
        return f"{self.op}-{self.opset}[{attrs}|{shapes}]"

    def model(self) -> onnx.ModelProto:
        order = self.order if self.order is not None else [*self.inputs, *self.consts]
        node = helper.make_node(self.op, [n or "" for n in order], [o for o, _ in self.outputs], **self.attrs)
        graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                        for n, a in self.inputs.items()]
        outputs = [helper.make_tensor_value_info(o, t, None) if o else None for o, t in self.outputs]
        inits = [numpy_helper.from_array(a, n) for n, a in self.consts.items()]
        graph = helper.make_graph([node], "one_node", graph_inputs, [o for o in outputs if o is not None], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10 if self.opset >= 21 else 8
        return model


F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _cases() -> list[OpCase]:
    c: list[OpCase] = []
    x4 = rand(2, 3, 5, 6)
    # --- pooling
    for opset in (1, 22):
        c.append(OpCase("GlobalMaxPool", opset, {"x": x4}))
    c.append(OpCase("GlobalMaxPool", 22, {"x": rand(2, 4, 7)}))
    c.append(OpCase("GlobalMaxPool", 22, {"x": rand(1, 2, 3, 4, 5)}))
    for p in (1, 2, 3):
        c.append(OpCase("GlobalLpPool", 2 if p == 2 else 22, {"x": x4}, {"p": p}, grad=("x",)))
    for opset, attrs, x in [
        (11, {"kernel_shape": [2, 2]}, x4),
        (11, {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "p": 1}, x4),
        (11, {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2], "p": 3}, x4),
        (11, {"kernel_shape": [2, 3], "auto_pad": "SAME_LOWER", "strides": [2, 2]}, x4),
        (11, {"kernel_shape": [2, 2], "auto_pad": "VALID", "strides": [2, 2]}, x4),
        (18, {"kernel_shape": [2, 2], "dilations": [2, 1], "strides": [1, 2]}, x4),
        (18, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, x4),
        (18, {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "p": 1}, rand(2, 3, 9)),
        (22, {"kernel_shape": [2, 2, 2], "strides": [1, 2, 2]}, rand(1, 2, 4, 4, 5)),
    ]:
        c.append(OpCase("LpPool", opset, {"x": x}, attrs, grad=("x",) if attrs.get("p", 2) != 1 else ()))
    # MaxUnpool: indices as onnxruntime's MaxPool returns them for a random image (flat over N, C, H, W)
    import onnxruntime as ort

    image = rand(2, 3, 6, 8)
    pool = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2])], "p",
                             [helper.make_tensor_value_info("x", F, image.shape)],
                             [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("i", I64, None)])
    pool_model = helper.make_model(pool, opset_imports=[helper.make_opsetid("", 12)])
    pool_model.ir_version = 8
    pooled, idx = ort.InferenceSession(pool_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": image})
    for opset in (9, 11, 22):
        c.append(OpCase("MaxUnpool", opset, {"x": pooled, "i": idx}, {"kernel_shape": [2, 2], "strides": [2, 2]}))
    c.append(OpCase("MaxUnpool", 11, {"x": pooled, "i": idx}, {"kernel_shape": [2, 2], "strides": [2, 2]},
                    consts={"shape": np.array([2, 3, 7, 9], np.int64)}))
    # --- activations
    for opset in (18, 22):
        c.append(OpCase("Mish", opset, {"x": rand(3, 4) * 4}))
    for alpha in (1.0, 0.5, 1.7):
        c.append(OpCase("Swish", 24, {"x": rand(3, 4) * 3}, {"alpha": alpha}))
    for opset, alpha in ((10, 1.0), (22, 0.3), (22, -0.5)):
        c.append(OpCase("ThresholdedRelu", opset, {"x": rand(4, 5) * 2}, {"alpha": alpha}))
    for lambd, bias in ((0.5, 0.0), (1.0, 0.3), (0.0, -0.2)):
        c.append(OpCase("Shrink", 9, {"x": rand(4, 5) * 2}, {"lambd": lambd, "bias": bias}))
    for opset, axis in ((1, 1), (11, 0), (11, 2), (13, -1), (13, 1), (13, 0)):
        c.append(OpCase("Hardmax", opset, {"x": rand(2, 3, 4)}, {"axis": axis}))
    c.append(OpCase("Hardmax", 13, {"x": np.array([[1, 3, 3, 2], [0, 0, 0, 0]], dtype=np.float32)}))  # ties: first max
    for op, lo, hi in (("Acosh", 1.0, 4.0), ("Asinh", -3.0, 3.0), ("Atanh", -0.9, 0.9), ("Cosh", -3.0, 3.0), ("Sinh", -3.0, 3.0)):
        for opset in (9, 22):
            c.append(OpCase(op, opset, {"x": rand(3, 5, low=lo, high=hi)}))
    # --- normalization
    for g in (1, 3, 6):
        c.append(OpCase("GroupNormalization", 18, {"x": rand(2, 6, 4, 5)}, {"num_groups": g, "epsilon": 1e-5},
                        consts={"scale": rand(g), "bias": rand(g)}, grad=("x", "scale", "bias")))
        c.append(OpCase("GroupNormalization", 21, {"x": rand(2, 6, 4, 5)}, {"num_groups": g, "epsilon": 1e-3},
                        consts={"scale": rand(6), "bias": rand(6)}, grad=("x", "scale", "bias")))
    c.append(OpCase("GroupNormalization", 21, {"x": rand(3, 4, 7)}, {"num_groups": 2},
                    consts={"scale": rand(4), "bias": rand(4)}))
    for axis, scale_shape in ((-1, (8,)), (-2, (5, 8)), (1, (3, 5, 8)), (2, (1, 8))):
        c.append(OpCase("RMSNormalization", 23, {"x": rand(2, 3, 5, 8)}, {"axis": axis, "epsilon": 1e-6},
                        consts={"scale": rand(*scale_shape)}, grad=("x", "scale")))
    c.append(OpCase("RMSNormalization", 23, {"x": rand(4, 6)}, {}, consts={"scale": rand(6)}))
    for opset, axis, p in ((1, -1, 2), (1, 1, 1), (22, 0, 2), (22, 2, 1)):
        c.append(OpCase("LpNormalization", opset, {"x": rand(3, 4, 5)}, {"axis": axis, "p": p}, grad=("x",)))
    for opset, axes in ((9, None), (13, None), (13, [1]), (13, [2, 3]), (13, [0, 1, 2, 3])):
        attrs = {} if axes is None else {"axes": axes}
        c.append(OpCase("MeanVarianceNormalization", opset, {"x": rand(2, 3, 4, 5)}, attrs))
    # --- attention
    b, s, d = 2, 5, 8
    q4, k4, v4 = rand(b, 4, s, d), rand(b, 4, s, d), rand(b, 4, s, d)
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4}, grad=("Q", "K", "V")))
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4}, {"is_causal": 1}))
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4}, {"scale": 0.2, "softcap": 3.0}))
    c.append(OpCase("Attention", 23, {"Q": q4, "K": rand(b, 4, 7, d), "V": rand(b, 4, 7, 6)}, {}))  # cross, v_head 6
    gqa_k, gqa_v = rand(b, 2, s, d), rand(b, 2, s, d)
    c.append(OpCase("Attention", 23, {"Q": q4, "K": gqa_k, "V": gqa_v}, {"is_causal": 1}))  # GQA 4/2
    c.append(OpCase("Attention", 23, {"Q": q4, "K": rand(b, 1, s, d), "V": rand(b, 1, s, d)}, {}))  # MQA
    c.append(OpCase("Attention", 23, {"Q": rand(b, s, 32), "K": rand(b, 6, 16), "V": rand(b, 6, 16)},
                    {"q_num_heads": 4, "kv_num_heads": 2}, grad=("Q", "K", "V")))  # 3-D GQA
    bool_mask = RNG.random((b, 1, s, s)) > 0.3
    bool_mask[..., 0] = True
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4, "mask": bool_mask}))
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4, "mask": rand(s, s)}, {"is_causal": 1}))
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4, "mask": rand(b, 4, s, 3)}, {},
                    onnx_reference="onnxruntime 1.32 refuses a mask shorter than the total sequence"))
    full_false = np.ones((s, s), dtype=bool)
    full_false[2] = False
    c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4, "mask": full_false}, {}))  # a fully masked row
    past = {"Q": rand(b, 4, 2, d), "K": rand(b, 4, 2, d), "V": rand(b, 4, 2, d), "pk": rand(b, 4, 3, d), "pv": rand(b, 4, 3, d)}
    for causal in (0, 1):
        c.append(OpCase("Attention", 23, past, {"is_causal": causal}, order=["Q", "K", "V", None, "pk", "pv"],
                        outputs=[("y", F), ("present_k", F), ("present_v", F)]))
    for mode in (0, 1, 2, 3):
        c.append(OpCase("Attention", 23, {"Q": q4, "K": k4, "V": v4, "mask": rand(s, s)},
                        {"qk_matmul_output_mode": mode, "softcap": 2.0, "is_causal": 1},
                        outputs=[("y", F), ("", F), ("", F), ("qk", F)],
                        onnx_reference="onnxruntime writes the float32 minimum, not the spec's -inf, at causally "
                                       "masked positions of qk_matmul_output" if mode == 2 else None))
    c.append(OpCase("Attention", 24, {"Q": q4, "K": gqa_k, "V": gqa_v}, {"is_causal": 1}))
    # rotary
    pos = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], dtype=np.int64)
    for interleaved in (0, 1):
        c.append(OpCase("RotaryEmbedding", 23, {"x": rand(2, 3, 5, 8), "pos": pos}, {"interleaved": interleaved},
                        consts={"cos": rand(10, 4), "sin": rand(10, 4)}, order=["x", "cos", "sin", "pos"]))
        c.append(OpCase("RotaryEmbedding", 23, {"x": rand(2, 5, 24), "cos": rand(2, 5, 2), "sin": rand(2, 5, 2)},
                        {"interleaved": interleaved, "num_heads": 3, "rotary_embedding_dim": 4}, grad=("x",)))
    # --- tensor
    for upper, k in ((1, None), (0, None), (1, -1), (0, 2), (1, 3)):
        consts = {} if k is None else {"k": np.array(k, dtype=np.int64)}
        c.append(OpCase("Trilu", 14, {"x": rand(2, 4, 5)}, {"upper": upper}, consts=consts))
    data = rand(3, 4)
    perm = np.stack([RNG.permutation(3) for _ in range(4)], axis=1)[:2]  # unique per column: no write conflicts
    for opset, axis, reduction, idx, upd in (
        (11, 0, None, perm, rand(2, 4)),
        (13, 1, None, np.array([[0, 3], [1, -1], [2, 0]], dtype=np.int64), rand(3, 2)),
        (16, 0, "add", RNG.integers(0, 3, (4, 4)), rand(4, 4)),
        (16, -1, "mul", RNG.integers(-4, 4, (3, 5)), rand(3, 5)),
        (18, 0, "max", RNG.integers(0, 3, (4, 4)), rand(4, 4)),
        (18, 1, "min", RNG.integers(0, 4, (3, 6)), rand(3, 6)),
    ):
        attrs = {"axis": axis} if reduction is None else {"axis": axis, "reduction": reduction}
        c.append(OpCase("ScatterElements", opset, {"x": data, "idx": idx.astype(np.int64), "u": upd}, attrs))
    for opset in (9, 10):
        c.append(OpCase("Scatter", opset, {"x": data, "idx": perm.astype(np.int64), "u": rand(2, 4)}, {"axis": 0}))
    for opset, axis, depth in ((9, -1, 5.0), (11, 0, 4.0), (11, 1, 6.0)):
        indices = np.array([[0, 3, -1], [2, 7, -4]], dtype=np.int64)
        c.append(OpCase("OneHot", opset, {"i": indices}, {"axis": axis},
                        consts={"depth": np.array([depth], dtype=np.float32), "values": np.array([-1.5, 2.0], np.float32)}))
    for opset, block in ((1, 2), (13, 2), (13, 3)):
        c.append(OpCase("SpaceToDepth", opset, {"x": rand(2, 3, 6, 12)}, {"blocksize": block}))
    for exclusive in (0, 1):
        for reverse in (0, 1):
            for axis in (0, -1):
                c.append(OpCase("CumProd", 26, {"x": rand(3, 4, low=0.5, high=1.5)}, {"exclusive": exclusive, "reverse": reverse},
                                consts={"axis": np.array(axis, dtype=np.int64)}))
    for opset in (15, 19, 21, 23):
        c.append(OpCase("CastLike", opset, {"x": rand(3, 4) * 5}, consts={"t": np.zeros(1, np.int32)},
                        outputs=[("y", TensorProto.INT32)]))
    cond = np.array([True, False, True], dtype=bool)
    for opset, axis in ((9, 0), (11, 1), (11, None), (11, -1)):
        attrs = {} if axis is None else {"axis": axis}
        c.append(OpCase("Compress", opset, {"x": rand(3, 4)}, attrs, consts={"cond": cond}))
    for batch_axis, time_axis, shape in ((1, 0, (5, 3, 2)), (0, 1, (3, 5, 2))):
        c.append(OpCase("ReverseSequence", 10, {"x": rand(*shape)}, {"batch_axis": batch_axis, "time_axis": time_axis},
                        consts={"lens": np.array([5, 1, 3], dtype=np.int64)}))
    for opset in (11, 22):
        c.append(OpCase("Det", opset, {"x": rand(2, 3, 3)}))
    for axes, shape in ((None, [2, 5, 3]), ([1, 2], [6, 1]), ([-1], [8]), ([2], [2]), (None, [1, 2, 4])):
        attrs = {} if axes is None else {"axes": axes}
        c.append(OpCase("CenterCropPad", 18, {"x": rand(2, 3, 5)}, attrs, consts={"shape": np.array(shape, dtype=np.int64)}))
    # --- resampling
    for mode, scales in (("nearest", [1.0, 1.0, 2.0, 3.0]), ("linear", [1.0, 1.0, 2.0, 2.0]), ("nearest", [1.0, 1.0, 1.5, 2.5]), ("linear", [1.0, 1.0, 2.5, 1.5])):
        c.append(OpCase("Upsample", 7, {"x": rand(1, 2, 3, 4)}, {"mode": mode, "scales": scales}))
        c.append(OpCase("Upsample", 9, {"x": rand(1, 2, 3, 4)}, {"mode": mode},
                        consts={"scales": np.array(scales, dtype=np.float32)}))
    grid = rand(2, 4, 5, 2, low=-1.2, high=1.2)
    for opset, modes in ((16, ("bilinear", "nearest", "bicubic")), (20, ("linear", "nearest", "cubic"))):
        for mode in modes:
            for padding in ("zeros", "border", "reflection"):
                for align in (0, 1):
                    c.append(OpCase("GridSample", opset, {"x": rand(2, 3, 6, 7), "grid": grid},
                                    {"mode": mode, "padding_mode": padding, "align_corners": align}))
    c.append(OpCase("GridSample", 22, {"x": rand(1, 2, 3, 4, 5), "grid": rand(1, 2, 3, 4, 3, low=-1, high=1)},
                    {"mode": "linear"}))
    for align in (0, 1):
        c.append(OpCase("AffineGrid", 20, {"theta": rand(2, 2, 3)}, {"align_corners": align},
                        consts={"size": np.array([2, 3, 4, 5], dtype=np.int64)}))
        c.append(OpCase("AffineGrid", 20, {"theta": rand(1, 3, 4)}, {"align_corners": align},
                        consts={"size": np.array([1, 1, 3, 4, 5], dtype=np.int64)}))
    c.append(OpCase("Col2Im", 18, {"x": rand(1, 2 * 4, 12)}, {},
                    consts={"image": np.array([4, 5], np.int64), "block": np.array([2, 2], np.int64)}))
    c.append(OpCase("Col2Im", 18, {"x": rand(2, 3 * 6, 6)}, {"strides": [2, 1], "pads": [1, 0, 1, 0], "dilations": [1, 2]},
                    consts={"image": np.array([5, 6], np.int64), "block": np.array([2, 3], np.int64)}))
    # --- spectral
    for op in ("HannWindow", "HammingWindow", "BlackmanWindow"):
        for periodic in (0, 1):
            c.append(OpCase(op, 17, {}, {"periodic": periodic}, consts={"size": np.array(10, np.int64)}))
    c.append(OpCase("HannWindow", 17, {}, {"output_datatype": TensorProto.DOUBLE}, consts={"size": np.array(7, np.int64)},
                    outputs=[("y", TensorProto.DOUBLE)]))
    sig = rand(2, 16, 1)
    for opset, attrs, x, consts, order in (
        (17, {}, sig, {}, None),
        (17, {"axis": 1, "onesided": 1}, sig, {}, None),
        (17, {"inverse": 1}, rand(2, 12, 2), {}, None),
        (17, {"axis": 2}, rand(2, 3, 8, 2), {"n": np.array(10, np.int64)}, ["x", "n"]),
        (20, {}, sig, {}, None),
        (20, {"onesided": 1}, rand(3, 16, 1), {"n": np.array(12, np.int64)}, ["x", "n"]),
        (20, {"inverse": 1}, rand(2, 5, 9, 2), {"axis": np.array(1, np.int64)}, ["x", None, "axis"]),
    ):
        c.append(OpCase("DFT", opset, {"x": x}, attrs, consts=consts, order=order))
    for onesided, with_window, length in ((1, True, None), (0, False, 8), (1, False, 6), (1, True, 8)):
        consts = {"step": np.array(3, np.int64)}
        order = ["x", "step"]
        if with_window:
            consts["window"] = rand(8, low=0.0, high=1.0)
        order.append("window" if with_window else None)
        if length is not None:
            consts["len"] = np.array(length, np.int64)
            order.append("len")
        c.append(OpCase("STFT", 17, {"x": rand(2, 30, 1) if onesided else rand(2, 30, 2)}, {"onesided": onesided},
                        consts=consts, order=order))
    # recurrent (rnn.py): plain RNN
    for direction in ("forward", "reverse", "bidirectional"):
        dirs = 2 if direction == "bidirectional" else 1
        c.append(OpCase("RNN", 14, {"x": rand(5, 2, 3), "h0": rand(dirs, 2, 4)}, {"hidden_size": 4, "direction": direction},
                        consts={"W": rand(dirs, 4, 3), "R": rand(dirs, 4, 4), "B": rand(dirs, 8)},
                        order=["x", "W", "R", "B", None, "h0"], outputs=[("y", F), ("y_h", F)], grad=("x",)))
    c.append(OpCase("RNN", 22, {"x": rand(4, 3, 2)}, {"hidden_size": 3}, consts={"W": rand(1, 3, 2), "R": rand(1, 3, 3)}))
    # deformable convolution: 3x3, offsets of a few pixels (many samples fall outside), mask, groups
    for opset, attrs, groups, with_mask in ((19, {}, (1, 1), False), (19, {"pads": [1, 1, 1, 1]}, (1, 1), True),
                                            (22, {"pads": [1, 0, 1, 0], "strides": [2, 1], "dilations": [1, 2],
                                                  "group": 2, "offset_group": 2}, (2, 2), True)):
        g, og = groups
        xin = rand(2, 4, 7, 8)
        w = rand(6, 4 // g, 3, 3)
        ph, pw = attrs.get("pads", [0, 0, 0, 0])[0], attrs.get("pads", [0, 0, 0, 0])[1]
        sh, sw = attrs.get("strides", [1, 1])
        dh, dw = attrs.get("dilations", [1, 1])
        oh, ow = (7 + 2 * ph - (2 * dh + 1)) // sh + 1, (8 + 2 * pw - (2 * dw + 1)) // sw + 1
        inputs = {"x": xin, "off": rand(2, og * 9 * 2, oh, ow) * 2}
        order = ["x", "w", "off", "b"]
        if with_mask:
            inputs["mask"] = rand(2, og * 9, oh, ow, low=0.0, high=1.0)
            order.append("mask")
        c.append(OpCase("DeformConv", opset, inputs, {"kernel_shape": [3, 3], **attrs}, consts={"w": w, "b": rand(6)},
                        order=order))
    c.append(OpCase("DeformConv", 19, {"x": rand(1, 2, 4, 4), "off": rand(1, 8, 3, 3)}, {"kernel_shape": [2, 2]},
                    consts={"w": rand(2, 2, 2, 2)}, order=["x", "w", "off"], grad=("x", "off")))
    # --- integer
    a8, b8 = RNG.integers(0, 256, (3, 4)).astype(np.uint8), RNG.integers(0, 256, (3, 4)).astype(np.uint8)
    for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        c.append(OpCase(op, 18, {"a": a8, "b": b8}, outputs=[("y", TensorProto.UINT8)]))
        c.append(OpCase(op, 18, {"a": a8.astype(np.int32) - 128, "b": b8.astype(np.int32)}, outputs=[("y", TensorProto.INT32)]))
    c.append(OpCase("BitwiseNot", 18, {"a": a8}, outputs=[("y", TensorProto.UINT8)]))
    for direction in ("LEFT", "RIGHT"):
        c.append(OpCase("BitShift", 11, {"a": a8, "s": RNG.integers(0, 8, (3, 4)).astype(np.uint8)},
                        {"direction": direction}, outputs=[("y", TensorProto.UINT8)]))
    # --- newer versions of operators onnx2torch has (aliases and guarded aliases)
    c.append(OpCase("Conv", 22, {"x": x4}, {"pads": [1, 1, 1, 1]}, consts={"w": rand(4, 3, 3, 3)}, grad=("w",)))
    c.append(OpCase("MaxPool", 22, {"x": x4}, {"kernel_shape": [2, 2]}))
    c.append(OpCase("Softplus", 22, {"x": x4}))
    c.append(OpCase("InstanceNormalization", 22, {"x": x4}, consts={"s": rand(3), "b": rand(3)}))
    c.append(OpCase("Reshape", 23, {"x": x4}, consts={"shape": np.array([2, -1], np.int64)}))
    c.append(OpCase("Transpose", 23, {"x": x4}, {"perm": [0, 2, 1, 3]}))
    # Resize (ours replaces onnx2torch's): every coordinate mode x interpolation mode, up and down
    img = rand(1, 2, 5, 7)
    roi0 = np.zeros(0, np.float32)
    for ctm in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"):
        for mode, extra in (("nearest", {"nearest_mode": "round_prefer_floor"}), ("nearest", {"nearest_mode": "round_prefer_ceil"}),
                            ("nearest", {"nearest_mode": "floor"}), ("nearest", {"nearest_mode": "ceil"}),
                            ("linear", {}), ("cubic", {}), ("cubic", {"exclude_outside": 1, "cubic_coeff_a": -0.5})):
            for scales in ([1.0, 1.0, 2.0, 1.5], [1.0, 1.0, 0.6, 0.5]):
                if ctm == "half_pixel_symmetric" and extra.get("nearest_mode") == "floor" and scales[2] < 1:
                    # known limit: here the exact source coordinate is an integer (1.0) and onnxruntime's
                    # float32 rounding lands on the other side of it than ours (and onnx.reference's)
                    continue
                opset = 19 if ctm == "half_pixel_symmetric" else 13
                c.append(OpCase("Resize", opset, {"x": img}, {"mode": mode, "coordinate_transformation_mode": ctm, **extra},
                                consts={"roi": roi0, "scales": np.array(scales, np.float32)}))
    for mode in ("nearest", "linear"):
        for scales in ([1.0, 1.0, 2.0, 1.5], [1.0, 1.0, 0.6, 0.5], [1.0, 1.0, 2.0, 3.0]):
            c.append(OpCase("Resize", 10, {"x": img}, {"mode": mode}, consts={"scales": np.array(scales, np.float32)}))
    for opset in (11, 18):
        c.append(OpCase("Resize", opset, {"x": img}, {"mode": "linear"}, order=["x", "roi", "scales", "sizes"],
                        consts={"roi": roi0, "scales": np.zeros(0, np.float32), "sizes": np.array([1, 2, 9, 4], np.int64)},
                        grad=("x",)))
    c[-1].order = ["x", None, None, "sizes"]
    c[-1].consts = {"sizes": np.array([1, 2, 9, 4], np.int64)}
    for mode in ("linear", "cubic"):
        c.append(OpCase("Resize", 18, {"x": img}, {"mode": mode, "antialias": 1}, order=["x", None, "scales"],
                        consts={"scales": np.array([1, 1, 0.5, 0.4], np.float32)}))
    c.append(OpCase("Resize", 18, {"x": img}, {"mode": "linear", "axes": [3, 2]}, order=["x", None, "scales"],
                    consts={"scales": np.array([1.5, 0.8], np.float32)}))
    c.append(OpCase("Resize", 13, {"x": img}, {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
                                               "extrapolation_value": -3.0},
                    consts={"roi": np.array([0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3], np.float32),
                            "scales": np.array([1, 1, 1.4, 1.2], np.float32)}))
    for opset, reduction, idx in ((16, "none", [[1], [-1]]), (16, "add", [[1], [3], [1]]), (16, "mul", [[0], [0], [2]]),
                                  (18, "max", [[2], [2], [0]]), (18, "min", [[3], [1], [3]])):
        c.append(OpCase("ScatterND", opset, {"x": rand(4, 3), "idx": np.array(idx, np.int64), "u": rand(len(idx), 3)},
                        {"reduction": reduction}))
    c.append(OpCase("ScatterND", 18, {"x": rand(3, 4, 2), "idx": np.array([[[0, 1], [2, 3]], [[1, 1], [0, 1]]], np.int64),
                                      "u": rand(2, 2, 2)}, {"reduction": "add"}))
    return c


CASES = _cases()
