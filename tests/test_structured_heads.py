"""``prune --structure heads``: attention blocks of torch exports (legacy and dynamo, nn.TransformerEncoderLayer
and a BERT-style self-attention), tensors that really shrink, onnxruntime running the result at other batch
sizes, equality with the zeroed-heads reference, structured OBS on Wo against its closed form, skips with reasons."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from fls_compress import compress
from fls_compress.configs import MagnitudeConfig, RunOptions, SparseGPTConfig
from fls_compress.errors import UnsupportedModelError
from fls_compress.structured.heads import find_head_groups
from fls_compress.structured.heads_rewrite import take_heads
from fls_compress.structured.shapes import probe

OPTS = RunOptions(progress=False, seed=0, latency=False)
E, H, D, S = 32, 4, 8, 6


class BertSelfAttention(torch.nn.Module):
    """HF BERT's self-attention as written there: separate q/k/v Linear, view [B, S, H, d], permute, scores /
    sqrt(d) + additive mask, softmax, P V, permute back, view [B, S, E], output Linear + residual."""

    def __init__(self, expose_probs: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, E) for _ in range(4))
        self.expose_probs = expose_probs

    def split(self, t):
        b, s, _ = t.shape
        return t.view(b, s, H, D).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + (1.0 - mask[:, None, None, :]) * -1e4
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        out = x + self.o(ctx.view(ctx.shape[0], ctx.shape[1], E))
        return (out, probs) if self.expose_probs else out


class TwoBlocks(torch.nn.Module):
    def __init__(self, expose_second: bool = False):
        super().__init__()
        self.a, self.b = BertSelfAttention(), BertSelfAttention(expose_probs=expose_second)

    def forward(self, x, mask):
        return self.b(torch.tanh(self.a(x, mask)), mask)


def _export(module: torch.nn.Module, path: Path, names: list[str], dynamo: bool, n_out: int = 1) -> Path:
    torch.manual_seed(0)
    module.eval()
    args = (torch.randn(2, S, E),) + ((torch.ones(2, S),) if "mask" in names else ())
    outs = ["y"] + [f"y{i}" for i in range(1, n_out)]
    if dynamo:
        batch = torch.export.Dim("n")
        torch.onnx.export(module, args, path, input_names=names, output_names=outs, dynamo=True, opset_version=18,
                          dynamic_shapes=tuple({0: batch} for _ in names))
    else:
        torch.onnx.export(module, args, path, input_names=names, output_names=outs, opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "n"} for n in names}, **{o: {0: "n"} for o in outs}})
    return path


def _data(tmp: Path, with_mask: bool, n: int = 24) -> Path:
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(n, S, E)).astype(np.float32)}
    if with_mask:
        mask = np.ones((n, S), dtype=np.float32)
        mask[::3, -2:] = 0.0  # some padded positions
        arrays["mask"] = mask
    np.savez(tmp / "calib.npz", **arrays)
    return tmp / "calib.npz"


class Encoder(torch.nn.Module):
    """One post-LN ``nn.TransformerEncoderLayer`` (packed in_proj, as in benchmarks/transformer_encoder.py)."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
        with torch.no_grad():
            self.layer.self_attn.out_proj.bias.normal_()  # nonzero, so that the exporters keep it

    def forward(self, x):
        return self.layer(x)


def _encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Encoder()


@pytest.fixture(params=["encoder-legacy", "encoder-dynamo", "bert-legacy", "bert-dynamo"])
def exported(request, tmp_path):
    kind, exporter = request.param.split("-")
    module = _encoder() if kind == "encoder" else TwoBlocks()
    names = ["x"] if kind == "encoder" else ["x", "mask"]
    path = _export(module, tmp_path / "m.onnx", names, exporter == "dynamo")
    return {"model": path, "calib": _data(tmp_path, kind == "bert"), "blocks": 1 if kind == "encoder" else 2,
            "dir": tmp_path}


def _feeds(calib: Path, n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in np.load(calib).items()}


def _run(model, feeds) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _zeroed_reference(path: Path, report: dict) -> onnx.ModelProto:
    """The original model with Wo's input rows of every removed head set to zero (nothing shrinks)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for g in report["structure"]["groups"]:
        node = next(n for n in model.graph.node if n.name == g["consumers"][0])
        w = numpy_helper.to_array(inits[node.input[1]]).copy()
        axis = 1 if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute) else 0
        view = np.moveaxis(w, axis, 0)
        for h in g["removed"]:
            view[h * g["head_dim"]:(h + 1) * g["head_dim"]] = 0
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    return model


def test_magnitude_heads_shrink_and_equal_the_zeroed_reference(exported):
    rep = compress(exported["model"], MagnitudeConfig(sparsity=0.5, structure="heads"), exported["calib"], options=OPTS)
    s = rep["structure"]
    assert s["structure"] == "heads" and s["skipped"] == [] and len(s["groups"]) == exported["blocks"]
    assert all(g["size"] == H and g["kept"] == H // 2 and g["head_dim"] == D for g in s["groups"])
    assert s["channels"] == H * exported["blocks"] and s["channels_removed"] == H // 2 * exported["blocks"]
    shapes = s["tensor_shapes"]
    for g in s["groups"]:  # Wq/Wk/Wv (packed or not) lose half their output columns, Wo half its input rows
        for p in g["producers"]:
            before, after = shapes[p]["before"], shapes[p]["after"]
            assert before[0] == after[0] or before[1] == after[1]
            assert math.prod(after) * 2 == math.prod(before)
    wo = [v for k, v in shapes.items() if v["before"] == [E, E] and v["after"] in ([E, E // 2], [E // 2, E])]
    assert len(wo) >= exported["blocks"]
    assert s["parameters"]["pruned"] < s["parameters"]["original"] and s["size_bytes"]["ratio"] < 1
    pruned = rep.model
    reference = _zeroed_reference(exported["model"], rep)
    for n in (1, 5):  # other batch sizes than the probes (2, 3): the rewritten shapes stay dynamic
        feeds = _feeds(exported["calib"], n)
        np.testing.assert_allclose(_run(pruned, feeds), _run(reference, feeds), rtol=1e-4, atol=2e-5)


def test_dynamo_reshape_constants_and_legacy_computed_targets_are_rewritten(tmp_path):
    dyn = _export(_encoder(), tmp_path / "d.onnx", ["x"], dynamo=True)
    leg = _export(_encoder(), tmp_path / "l.onnx", ["x"], dynamo=False)
    calib = _data(tmp_path, False)
    for path in (dyn, leg):
        before = onnx.load(str(path))
        rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="heads"), calib, options=OPTS)
        after, g = rep.model, rep["structure"]["groups"][0]
        assert g["reshapes_rewritten"] >= 3
        old_consts = [v.tolist() for k, v in _inits(before).items() if v.dtype == np.int64 and v.ndim == 1]
        new_consts = [v.tolist() for k, v in _inits(after).items() if v.dtype == np.int64 and v.ndim == 1]
        if path == dyn:  # constant targets: e.g. [S, -1, 3, E] -> [S, -1, 3, E/2], [-1, H, S, d] -> [-1, H/2, S, d]
            assert any(E in c for c in old_consts) and any(E // 2 in c and E not in c for c in new_consts)
            assert any(c[:2] == [-1, H // 2] for c in new_consts)
        else:  # computed targets (Shape/Gather/Concat): scaled by Mul + Div nodes, H'/H on the head entry
            muls = [n for n in after.graph.node if n.op_type == "Mul" and n.name.endswith("_heads_mul")]
            assert len(muls) == g["reshapes_rewritten"]
            nums = {k: v for k, v in _inits(after).items() if k.endswith("_heads_num")}
            assert all(sorted(v.tolist()).count(1) == len(v) - 1 and H // 2 in v.tolist() for v in nums.values())


def _captured_wo_inputs(path: Path, calib: Path, wo_input: str) -> np.ndarray:
    model = onnx.load(str(path))
    model.graph.output.append(onnx.ValueInfoProto(name=wo_input))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([wo_input], dict(np.load(calib)))[0]
    return got.reshape(-1, got.shape[-1]).astype(np.float64)


def test_structured_obs_on_wo_equals_the_damped_least_squares_refit(tmp_path):
    """Greedy structured OBS over whole heads ends at W_R' = W H[:, R] H[R, R]^-1 (H = 2 X^T X / n + damping,
    X: Wo's inputs), i.e. the refit of the kept heads' columns on the captured activations."""
    path = _export(BertSelfAttention(), tmp_path / "m.onnx", ["x", "mask"], dynamo=False)
    calib = _data(tmp_path, True)
    percdamp = 0.05
    held_out = tmp_path / "eval.npz"
    np.savez(held_out, **{k: v[:4] for k, v in np.load(calib).items()})  # so that every calibration sample is used
    rep = compress(path, SparseGPTConfig(sparsity=0.5, structure="heads", percdamp=percdamp), calib, eval_data=held_out,
                   options=OPTS)
    g = rep["structure"]["groups"][0]
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == g["consumers"][0])
    assert node.op_type == "MatMul"  # BERT's output Linear with a bias: MatMul + Add (no bias compensation)
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[1])).astype(np.float64).T
    x = _captured_wo_inputs(path, calib, node.input[0])
    h = 2 * x.T @ x / len(x)
    h += percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    keep = [c for hd in range(H) if hd not in g["removed"] for c in range(hd * D, (hd + 1) * D)]
    expected = w @ h[:, keep] @ np.linalg.inv(h[np.ix_(keep, keep)])
    got = _inits(rep.model)[node.input[1]].T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    costs = g["obs_costs"]
    assert len(costs) == H // 2 and all(c >= 0 for c in costs)


def test_take_heads_packed_layout():
    arr = np.arange(2 * 3 * 4 * 2).reshape(2, 24)  # (outer 3, heads 4, inner 2) along axis 1
    out = take_heads(arr, np.array([1, 3]), 1, 3, 4, 2)
    assert out[0].tolist() == [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23]


def test_unprovable_block_is_skipped_with_reason(tmp_path):
    """The second block's attention probabilities are a graph output (their head axis must not change): it stays
    whole with that reason, the first block is pruned; with only such a block nothing can be removed (exit 4)."""
    path = _export(TwoBlocks(expose_second=True), tmp_path / "m.onnx", ["x", "mask"], dynamo=False, n_out=2)
    calib = _data(tmp_path, True)
    rep = compress(path, MagnitudeConfig(sparsity=0.5, structure="heads"), calib, options=OPTS)
    s = rep["structure"]
    assert len(s["groups"]) == 1 and len(s["skipped"]) == 1
    assert "graph output" in s["skipped"][0]["reason"]
    only = _export(BertSelfAttention(expose_probs=True), tmp_path / "o.onnx", ["x", "mask"], dynamo=False, n_out=2)
    with pytest.raises(UnsupportedModelError, match="no heads group .*graph output"):
        compress(only, MagnitudeConfig(sparsity=0.5, structure="heads"), calib, options=OPTS)


def test_fused_attention_operator_is_skipped_with_reason(tmp_path):
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    f = np.float32
    inits = [numpy_helper.from_array(rng.normal(size=(E, 3 * E)).astype(f), "qkv"),
             numpy_helper.from_array(np.zeros(3 * E, f), "qkv_b"),
             numpy_helper.from_array(rng.normal(size=(E, E)).astype(f), "wo")]
    nodes = [helper.make_node("Attention", ["x", "qkv", "qkv_b"], ["a"], domain="com.microsoft", num_heads=H, name="attn"),
             helper.make_node("MatMul", ["a", "wo"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", S, E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", S, E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    groups, skipped = find_head_groups(model, probe(model, {"x": rng.normal(size=(3, S, E)).astype(f)}))
    assert groups == [] and len(skipped) == 1 and "fused com.microsoft.Attention" in skipped[0].reason


def test_cli_structure_heads(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    path = _export(_encoder(), tmp_path / "m.onnx", ["x"], dynamo=False)
    calib = _data(tmp_path, False)
    out, rep_path = tmp_path / "o.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(app, ["prune", str(path), "--data", str(calib), "-o", str(out), "-m", "sparsegpt",
                                   "--structure", "heads", "--sparsity", "0.5", "--report", str(rep_path)])
    assert res.exit_code == 0, res.output
    rep = json.loads(rep_path.read_text())
    s = rep["structure"]
    assert s["structure"] == "heads" and s["selection"] == "obs" and s["skipped"] == []
    assert s["parameters"]["pruned"] < s["parameters"]["original"]
    assert s["size_bytes"]["pruned"] < s["size_bytes"]["original"]
    assert s["groups"][0]["kept"] == H // 2 and len(s["groups"][0]["obs_costs"]) == H // 2
    assert rep["sparsity"]["structure"] == "heads" and rep["sparsity"]["achieved"] == 0.5
    _run(out, {"x": np.load(calib)["x"][:4]})  # onnxruntime loads and runs the written file
    res = CliRunner().invoke(app, ["prune", str(path), "--data", str(calib), "-o", str(out), "-m", "wanda",
                                   "--structure", "heads"])
    assert getattr(res.exception, "exit_code", None) == 2 and "does not apply to -m wanda" in str(res.exception)
