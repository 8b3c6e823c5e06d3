"""Every corpus model (tests/corpus/builder.py: real-export structures built offline) compresses to
50% with FLS and with magnitude pruning, the result runs in onnxruntime, and the graph is the
original one with only the pruned weight payloads changed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fls_compress.io.calibration import load_calibration
from fls_compress.io.onnx_model import load_onnx, read_weight
from tests.corpus.builder import BUILDERS, CorpusModel, build
from tests.corpus.identity import assert_same_graph_except

METHODS = ("fls", "sparsegpt", "magnitude")


def compress(entry: CorpusModel, method: str, out: Path, sparsity: float = 0.5, synthetic: bool = False) -> dict[str, Any]:
    """The ONE call into the compression API (kept here so the API can be switched in one place)."""
    from fls_compress import FLSConfig, MagnitudeConfig, RunOptions, SparseGPTConfig
    from fls_compress import compress as run

    configs = {
        "fls": lambda: FLSConfig(sparsity=sparsity, fit_steps=4, refit_steps=2, batch_size=8, moment_samples=16, steps=1),
        "sparsegpt": lambda: SparseGPTConfig(sparsity=sparsity),
        "magnitude": lambda: MagnitudeConfig(sparsity=sparsity),
    }
    config = configs[method]()
    shape = tuple(f"{k}={'x'.join(str(d) for d in v)}" for k, v in entry.shapes.items())
    const = tuple(f"{k}={v}" for k, v in entry.consts.items())
    options = RunOptions(num_calibration=16, progress=False, shape=shape, const=const)
    return run(entry.path, config, None if synthetic else entry.data, output=out, options=options)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def entries(corpus_dir: Path) -> dict[str, CorpusModel]:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return {name: build(name, corpus_dir) for name in BUILDERS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_corpus_model_compresses_to_half(name: str, method: str, entries: dict[str, CorpusModel], tmp_path: Path) -> None:
    entry = entries[name]
    out = tmp_path / f"{name}_{method}.onnx"
    report = compress(entry, method, out)
    assert report["status"] == "ok"
    per_layer = report["sparsity"]["per_layer"]
    assert per_layer, "no prunable weights found"
    assert abs(report["sparsity"]["achieved"] - 0.5) < 0.01
    if method != "sparsegpt":  # the torch module (curvature, weight map) matched onnxruntime before pruning
        assert report["conversion"]["max_rel_error_vs_onnxruntime"] < (1e-2 if "fp16" in name else 1e-4)

    original = load_onnx(entry.path)
    written = load_onnx(out)
    assert_same_graph_except(original, written, set(per_layer))
    total = sum(v["numel"] for v in per_layer.values())
    zeros = sum(int(np.count_nonzero(read_weight(written, n) == 0)) for n in per_layer)
    assert abs(zeros / total - 0.5) < 0.01

    calib = load_calibration(entry.data, original, shapes=entry.shapes, consts=entry.consts)
    feed = next(calib.batches(4))
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feed)
    assert all(np.all(np.isfinite(o)) for o in outputs)
    verification = report["verification"]
    assert set(verification["outputs"]) == {o.name for o in original.graph.output}
    for stats in verification["outputs"].values():
        assert stats["cosine_similarity"] > 0.0


def test_corpus_specifics_are_reported(entries: dict[str, CorpusModel], tmp_path: Path) -> None:
    """The structures each corpus model was built for are the ones the report describes."""
    paddle = compress(entries["paddle_constants_op13"], "magnitude", tmp_path / "p.onnx")
    assert set(paddle["sparsity"]["per_layer"]) == {"conv_w", "fc_w"}
    assert paddle["conversion"]["observed_shapes"] >= 1
    guessed = compress(entries["paddle_constants_op13"], "magnitude", tmp_path / "g.onnx", synthetic=True)
    assert guessed["calibration"]["defaulted_dims"] == {"x": [2, 3]}
    assert guessed["calibration"]["synthetic_shapes"]["x"][1:] == [3, 32, 32]
    vad = compress(entries["scalar_if_op16"], "magnitude", tmp_path / "v.onnx")
    assert vad["conversion"]["bound_inputs"] == ["sr"]
    assert [f["branch"] for f in vad["conversion"]["folded_ifs"]] == ["then_branch"]
    assert set(vad["sparsity"]["per_layer"]) == {"w_in", "w16", "w_out"}  # w16: inside the branch taken
    assert vad["conversion"]["unpruned_branch_weights"] == ["w8"]
    branch = next(a.g for a in onnx.load(str(tmp_path / "v.onnx")).graph.node[5].attribute if a.name == "then_branch")
    zeros = float(np.mean(onnx.numpy_helper.to_array(branch.initializer[0]) == 0))
    assert zeros > 0 and zeros == vad["sparsity"]["per_layer"]["w16"]["sparsity"]
    yolo = compress(entries["yolo_head_torchscript_op17"], "magnitude", tmp_path / "y.onnx")
    assert yolo["verification"]["task"] == "detection"
    boxes = yolo["verification"]["outputs"]["output0"]
    assert boxes["topk_boxes"] == 80 and 0.0 <= boxes["topk_box_agreement"] <= 1.0  # 8x8 + 4x4 anchors
    lstm = compress(entries["lstm_torchscript_op14"], "magnitude", tmp_path / "l.onnx")
    assert {v["op_type"] for v in lstm["sparsity"]["per_layer"].values()} >= {"LSTM", "MatMul"}
    half = compress(entries["fp16_mlp_op17"], "magnitude", tmp_path / "h.onnx")
    assert half["conversion"]["compute_dtype"].startswith("float32 (model stores float16")
    assert onnx.load(str(tmp_path / "h.onnx")).graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
