"""Every option has an effect or is refused: one case per knob of every config (issue: no silent options).

Each case changes ONE knob from a base config and asserts that the pruned weights differ from the base
run (or, for options that only touch verification/output, that the report or file changes). A coverage
test fails when a config gains a knob without a case here.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress import (
    FLSConfig, IEFConfig, MagnitudeConfig, MFACConfig, OBertConfig, RunOptions, SparseGPTConfig, WandaConfig, compress,
)
from fls_compress.configs import AutoConfig, FLSQuantConfig, GPTQConfig, RTNConfig
from fls_compress.configs.recovery import Recovery
from fls_compress.errors import InvalidOptionError, VerificationError
from fls_compress.runtime import fast_matmul_backend

RUN = RunOptions(progress=False, num_calibration=192)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """Gemm 12 -> 24 (tanh) -> 4 logits, with the hidden layer as a second output; labelled data."""
    d = tmp_path_factory.mktemp("opt")
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(24, 12)) / 3).astype(np.float32)
    w2 = (rng.normal(size=(4, 24)) / 4).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1),
        helper.make_node("Tanh", ["h0"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", 24])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(24, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "mlp.onnx")
    x = rng.normal(size=(256, 12)).astype(np.float32)
    logits = np.tanh(x @ w1.T) @ w2.T
    np.savez(d / "calib.npz", x=x, labels=logits.argmax(1))
    return d


def pruned(mlp, config, opts=RUN) -> dict[str, np.ndarray]:
    rep = compress(mlp / "mlp.onnx", config, mlp / "calib.npz", options=opts)
    arrays = {t.name: numpy_helper.to_array(t) for t in rep.model.graph.initializer}
    # the auxiliary fit's own record counts too: a FishLeg fit the validation guard reverts leaves the weights
    # unchanged but is a different fit (its validation loss is reported)
    if "validation_aux_loss_after" in rep["method_info"]:
        arrays["validation_aux_loss_after"] = np.asarray(rep["method_info"]["validation_aux_loss_after"])
    if "fit_matmul" in rep["method_info"]:  # the arithmetic the fit ran with (on tiny layers bf16 and float32 agree)
        arrays["fit_matmul"] = np.asarray(rep["method_info"]["fit_matmul"])
    return arrays


def differs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Any weight (float, or integer codes/scales of a quantized one) differs, or the set of tensors does."""
    if set(a) != set(b):
        return True
    return any(a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]) for k in a)


FLS = dict(sparsity=0.6, fit_steps=10, refit_steps=5, moment_samples=64)
EF = dict(sparsity=0.6, num_grads=32, block_size=16)
# (config class, base kwargs, knob, changed value)
CASES = [
    (FLSConfig, FLS, "sparsity", 0.8),
    (FLSConfig, {**FLS, "sparsity": None}, "pattern", "2:4"),
    (FLSConfig, FLS, "exclude", ("w1",)),
    (FLSConfig, FLS, "scope", "layer"),
    (FLSConfig, FLS, "steps", 1),
    (FLSConfig, FLS, "likelihood", "gaussian"),
    (FLSConfig, FLS, "output_name", "hidden"),
    (FLSConfig, FLS, "damping", 0.5),
    (FLSConfig, FLS, "relative_damping", 5.0),
    (FLSConfig, FLS, "q_form", "block"),
    (FLSConfig, FLS, "q_form", "ekfac"),
    (FLSConfig, FLS, "refit", "restart"),
    (FLSConfig, {**FLS, "q_form": "block"}, "block_size", 8),
    (FLSConfig, FLS, "q_init", "identity"),
    (FLSConfig, FLS, "fit_steps", 0),
    (FLSConfig, FLS, "refit_steps", 0),
    (FLSConfig, FLS, "aux_lr", 0.05),
    (FLSConfig, FLS, "batch_size", 4),
    (FLSConfig, FLS, "precondition", False),
    (FLSConfig, FLS, "fit_matmul", "float32"),
    (FLSConfig, FLS, "probes", 3),
    (FLSConfig, {**FLS, "fit_steps": 400}, "fit_seconds", 1e-4),
    (FLSConfig, FLS, "obs_update", "decoupled"),
    (FLSConfig, FLS, "moment_samples", 8),
    (OBertConfig, EF, "sparsity", 0.8),
    (OBertConfig, {**EF, "sparsity": None}, "pattern", "2:4"),
    (OBertConfig, EF, "exclude", ("w2",)),
    (OBertConfig, EF, "scope", "layer"),
    (OBertConfig, EF, "steps", 1),
    (OBertConfig, EF, "likelihood", "gaussian"),
    (OBertConfig, EF, "output_name", "hidden"),
    (OBertConfig, EF, "damping", 1.0),
    (OBertConfig, EF, "relative_damping", 10.0),
    (OBertConfig, EF, "num_grads", 8),
    (OBertConfig, EF, "block_size", 4),
    (IEFConfig, EF, "num_grads", 8),
    (IEFConfig, EF, "block_size", 4),
    (MFACConfig, dict(sparsity=0.6, num_grads=32), "num_grads", 8),
    (MFACConfig, dict(sparsity=0.6, num_grads=32), "relative_damping", 10.0),
    (SparseGPTConfig, dict(sparsity=0.6), "percdamp", 2.0),
    (SparseGPTConfig, dict(sparsity=0.6), "lazy_block", 4),
    (SparseGPTConfig, dict(sparsity=0.6), "sequential", False),
    (SparseGPTConfig, dict(sparsity=0.6), "max_rows_per_layer", 16),
    (SparseGPTConfig, dict(sparsity=0.6), "sparsity", 0.8),
    (SparseGPTConfig, dict(), "pattern", "2:4"),
    (SparseGPTConfig, dict(sparsity=0.6), "exclude", ("w1",)),
    (WandaConfig, dict(sparsity=0.8), "sequential", False),  # ranks per row change only where recaptured norms reorder
    (MagnitudeConfig, dict(sparsity=0.6), "scope", "layer"),
    (MagnitudeConfig, dict(sparsity=0.6), "sparsity", 0.8),
    (MagnitudeConfig, dict(), "pattern", "2:4"),
    (MagnitudeConfig, dict(sparsity=0.6), "exclude", ("w1",)),
    (AutoConfig, dict(sparsity=0.6), "sparsity", 0.8),
    (RTNConfig, dict(bits=4), "bits", 8),
    (RTNConfig, dict(bits=4), "granularity", "per-tensor"),
    (RTNConfig, dict(bits=4), "symmetric", False),
    (RTNConfig, dict(bits=8), "activations", "int8"),  # 4-bit: every layer is MatMulNBits (accuracy_level only)
    (RTNConfig, dict(bits=8, activations="int8"), "activations", "int8-dynamic"),
    (RTNConfig, dict(bits=4), "sparsity", 0.5),
    (RTNConfig, dict(bits=4), "pattern", "2:4"),
    (RTNConfig, dict(bits=4), "exclude", ("w1",)),
    (RTNConfig, dict(bits=8, activations="int8"), "act_calibration", "percentile:99"),
    (GPTQConfig, dict(bits=4), "percdamp", 1.0),
    (GPTQConfig, dict(bits=4, sparsity=0.5), "lazy_block", 4),
    (GPTQConfig, dict(bits=4), "act_order", True),
    (GPTQConfig, dict(bits=4, sparsity=0.8), "sequential", False),
    (GPTQConfig, dict(bits=4), "max_rows_per_layer", 8),
    (GPTQConfig, dict(bits=4), "hessian_shrinkage", "none"),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "likelihood", "gaussian"),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "output_name", "hidden"),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "damping", 0.5),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "relative_damping", 5.0),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "q_init", "identity"),
    (FLSQuantConfig, dict(bits=4, fit_steps=10, q_init="identity"), "fit_steps", 0),  # a fit from I/gamma is kept
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "aux_lr", 0.05),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "batch_size", 4),
    (FLSQuantConfig, dict(bits=4, fit_steps=10, aux_lr=1e-3, batch_size=64), "precondition", False),
    (FLSQuantConfig, dict(bits=4, fit_steps=10), "moment_samples", 8),
    (FLSQuantConfig, dict(bits=4, fit_steps=10, sparsity=0.5), "lazy_block", 4),
]
# knobs shared through a base class are exercised on one representative subclass
INHERITED_ELSEWHERE = {
    IEFConfig: {"sparsity", "pattern", "exclude", "scope", "steps", "likelihood", "output_name", "damping", "relative_damping"},
    MFACConfig: {"sparsity", "pattern", "exclude", "scope", "steps", "likelihood", "output_name", "damping"},
    WandaConfig: {"sparsity", "pattern", "exclude", "max_rows_per_layer"},
    AutoConfig: {"pattern", "exclude"},
    # --structure needs a graph with removable groups (this fixture's hidden layer is a graph output):
    # tests/test_structured.py::test_structured_knobs_change_the_result covers it and its interplay with the others
    MagnitudeConfig: {"structure", "channel_multiple"},
    SparseGPTConfig: {"structure", "channel_multiple"},
    # matmul_format changes the format of 4-bit MatMul weights (this MLP has Gemm only): tests/test_latency.py
    RTNConfig: {"matmul_format"},
    GPTQConfig: {"sparsity", "pattern", "exclude", "bits", "granularity", "symmetric", "activations", "act_calibration",
                 "matmul_format"},
    FLSQuantConfig: {"sparsity", "pattern", "exclude", "bits", "granularity", "symmetric", "activations", "fit_seconds", "probes",
                     "fit_matmul", "act_calibration", "matmul_format"},
}


# the --recover-* knobs (configs/recovery.py) each have a "changes the result" case in tests/test_recovery.py
RECOVERY_KNOBS = {f.name for f in Recovery.knobs()}


def test_every_knob_has_a_case():
    for cls in (FLSConfig, OBertConfig, IEFConfig, MFACConfig, SparseGPTConfig, WandaConfig, MagnitudeConfig, AutoConfig,
                RTNConfig, GPTQConfig, FLSQuantConfig):
        covered = {knob for c, _, knob, _ in CASES if c is cls} | INHERITED_ELSEWHERE.get(cls, set())
        covered |= RECOVERY_KNOBS if issubclass(cls, Recovery) else set()
        assert covered == {f.name for f in cls.knobs()}, (cls.__name__, {f.name for f in cls.knobs()} - covered)


@pytest.mark.parametrize("cls, base, knob, value", CASES, ids=[f"{c.method}-{k}" for c, _, k, _ in CASES])
def test_knob_changes_the_pruned_weights(mlp, cls, base, knob, value):
    if knob == "fit_matmul" and fast_matmul_backend("cpu") is None:
        pytest.skip("this CPU has no bf16 matmul instructions: 'fast' and 'float32' run the same arithmetic here")
    before = pruned(mlp, cls(**base))
    after = pruned(mlp, cls(**{**base, knob: value}))
    assert differs(before, after), f"{cls.method} --{knob} {value} changed nothing"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(q_form="kron", block_size=8), "--block-size applies to --q-form block"),
    (dict(q_form="block", q_init="kfac"), "--q-init kfac needs --q-form kron"),
    (dict(q_form="block", obs_update="row-exact"), "needs --q-form kron"),
    (dict(q_form="kron", obs_update="block-exact"), "needs --q-form block"),
    (dict(damping=0.1, relative_damping=0.1), "not both"),
    (dict(sparsity=0.5, pattern="2:4"), "not both"),
    (dict(pattern="2:4", steps=3), "--steps > 1 does not apply"),
    (dict(pattern="2:4", scope="layer"), "--scope does not apply"),
    (dict(aux_lr=float("nan")), "finite"),
    (dict(damping=float("inf")), "finite"),
    (dict(fit_steps=-1), ">= 0"),
    (dict(steps=0), ">= 1"),
    (dict(batch_size=-1), ">= 1"),
    (dict(aux_lr=-1.0), "> 0"),
])
def test_inconsistent_or_out_of_range_knobs_are_refused(kwargs, fragment):
    with pytest.raises(InvalidOptionError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        FLSConfig(**kwargs)


def test_unknown_keys_are_refused_and_dicts_round_trip():
    cfg = FLSConfig(sparsity=0.7, exclude=("a*",), fit_steps=3)
    assert FLSConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidOptionError, match="unknown key"):
        FLSConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(InvalidOptionError, match="unknown key"):
        RunOptions.from_dict({"seeds": 1})
    with pytest.raises(InvalidOptionError, match="--seed must be >= 0"):
        RunOptions(seed=-1)


def test_run_options_change_results_or_outputs(mlp, tmp_path, caplog):
    base = pruned(mlp, FLSConfig(**FLS))
    assert differs(base, pruned(mlp, FLSConfig(**FLS), RunOptions(progress=False, num_calibration=192, seed=1)))
    assert differs(base, pruned(mlp, FLSConfig(**FLS), RunOptions(progress=False, num_calibration=64)))
    r1 = compress(mlp / "mlp.onnx", MagnitudeConfig(), mlp / "calib.npz", options=RunOptions(progress=False, holdout_fraction=0.5))
    assert r1["verification"]["num_samples"] == 128
    compress(mlp / "mlp.onnx", MagnitudeConfig(), mlp / "calib.npz", options=RunOptions(progress=False, threads=1))
    assert torch.get_num_threads() == 1
    dense, sparse = tmp_path / "d.onnx", tmp_path / "s.onnx"
    compress(mlp / "mlp.onnx", MagnitudeConfig(sparsity=0.9), mlp / "calib.npz", output=dense, options=RUN)
    compress(mlp / "mlp.onnx", MagnitudeConfig(sparsity=0.9), mlp / "calib.npz", output=sparse,
             options=RunOptions(progress=False, sparse_storage=True))
    assert sparse.stat().st_size < dense.stat().st_size
    with caplog.at_level(logging.INFO, logger="fls_compress"):
        compress(mlp / "mlp.onnx", FLSConfig(**FLS), mlp / "calib.npz", options=RunOptions(progress=True))
        shown = sum("step 1/4" in r.getMessage() for r in caplog.records)
        caplog.clear()
        compress(mlp / "mlp.onnx", FLSConfig(**FLS), mlp / "calib.npz", options=RUN)
        hidden = sum("step 1/4" in r.getMessage() for r in caplog.records)
    assert shown == 1 and hidden == 0


def test_device_option(mlp):
    rep = compress(mlp / "mlp.onnx", MagnitudeConfig(), mlp / "calib.npz", device="auto", options=RUN)
    assert rep["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOptionError, match="no CUDA device"):
            compress(mlp / "mlp.onnx", MagnitudeConfig(), mlp / "calib.npz", device="cuda", options=RUN)


@pytest.mark.parametrize("gate", [dict(min_agreement=1.0), dict(max_rel_error=1e-9), dict(min_cosine=1.0)])
def test_verification_gates_fail_and_leave_no_model(mlp, tmp_path, gate):
    out, rep_path = tmp_path / "o.onnx", tmp_path / "r.json"
    with pytest.raises(VerificationError) as info:
        compress(mlp / "mlp.onnx", MagnitudeConfig(sparsity=0.9), mlp / "calib.npz", output=out, report=rep_path,
                 options=RunOptions(progress=False, **gate))
    assert not out.exists() and rep_path.exists()
    assert info.value.report["status"] == "failed" and info.value.report["exit_code"] == 6
    with pytest.raises(VerificationError):
        compress(mlp / "mlp.onnx", MagnitudeConfig(sparsity=0.9), mlp / "calib.npz", output=out,
                 options=RunOptions(progress=False, keep_failed=True, **gate))
    assert out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "r.json"]  # no staging leftovers


def test_min_agreement_on_a_model_without_class_logits_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 6])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 3, 6)).astype(np.float32))
    with pytest.raises(VerificationError, match="--min-agreement needs a classifier"):
        compress(tmp_path / "m.onnx", MagnitudeConfig(), tmp_path / "d.npz", options=RunOptions(progress=False, min_agreement=0.5))
