"""Structured pruning with distillation of the smaller graph (``prune --structure ... --recover-steps N``):
one prune then fine-tuning, and the gradual schedule with fine-tuning after every structured step."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from fls_compress import compress
from fls_compress.configs import FLSConfig, MagnitudeConfig, RunOptions, SparseGPTConfig, config_from_dict
from fls_compress.errors import InvalidOptionError
from fls_compress.recovery.schedule import sparsity_schedule
from fls_compress.structured.selection import removal_count
from tests.test_cli import run_cli
from tests.test_structured import _bn_cnn, _inits, _mlp, _run, _save

OPTS = RunOptions(progress=False, seed=0, latency=False)
RECOVER = dict(recover_steps=1, recover_final_iters=80, recover_lr=3e-3)


@pytest.fixture()
def cnn(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(_bn_cnn(rng), tmp_path / "bn_cnn.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(192, 2, 8, 8)).astype(np.float32), labels=rng.integers(0, 5, 192))
    np.savez(tmp_path / "extra.npz", x=rng.normal(size=(64, 2, 8, 8)).astype(np.float32), labels=rng.integers(0, 5, 64))
    x_test = rng.normal(size=(64, 2, 8, 8)).astype(np.float32)
    return {"model": path, "calib": tmp_path / "calib.npz", "extra": tmp_path / "extra.npz", "x": x_test, "dir": tmp_path}


def test_recovery_after_magnitude_channels_keeps_the_structure_and_closes_the_gap(cnn):
    """The recovered model removes the same channels as the one-shot prune (same shrunk tensors, same
    biases and BatchNorm vectors: only Conv/Gemm weights train), lowers the held-out distillation loss,
    and is closer to the dense model on inputs it never saw."""
    one_shot = compress(cnn["model"], MagnitudeConfig(sparsity=0.5, structure="channels"), cnn["calib"], options=OPTS)
    rep = compress(cnn["model"], MagnitudeConfig(sparsity=0.5, structure="channels", **RECOVER), cnn["calib"],
                   options=OPTS)
    assert [g["removed"] for g in rep["structure"]["groups"]] == [g["removed"] for g in one_shot["structure"]["groups"]]
    new, old = _inits(rep.model), _inits(one_shot.model)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    assert new["c1.w"].shape == (3, 2, 3, 3) and new["fc.w"].shape == (5, 32)
    for name in ("c1.b", "bn.s", "bn.b", "bn.m", "bn.v", "c2.b", "fc.b"):  # not trained
        np.testing.assert_array_equal(new[name], old[name])
    assert not np.array_equal(new["fc.w"], old["fc.w"])
    rec = rep["recovery"]
    step = rec["steps"][0]
    assert rec["likelihood"] == rep["likelihood"] and rec["schedule"] == [0.5]
    assert step["iters_run"] > 0 and step["heldout_after"] < step["heldout_before"]
    assert step["achieved"] == pytest.approx(0.5) and rec["improved"] is True
    assert rec["inputs"]["train"] + rec["inputs"]["heldout"] == rec["inputs"]["calibration"] > 100
    dense = _run(cnn["model"], cnn["x"])
    gap = lambda m: float(np.linalg.norm(_run(m, cnn["x"]) - dense))  # noqa: E731
    assert gap(rep.model) < gap(one_shot.model)


def test_recovery_after_structured_obs_is_deterministic(cnn):
    cfg = SparseGPTConfig(sparsity=0.5, structure="channels", **RECOVER)
    a = compress(cnn["model"], cfg, cnn["calib"], options=OPTS)
    b = compress(cnn["model"], cfg, cnn["calib"], options=OPTS)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a["recovery"]["steps"][0]["heldout_after"] <= a["recovery"]["steps"][0]["heldout_before"]


def test_structured_recovery_refusals():
    with pytest.raises(InvalidOptionError, match="needs --structure"):
        MagnitudeConfig(sparsity=0.5, recover_steps=1)
    with pytest.raises(InvalidOptionError, match="--recover-iters sets the steps between gradual prunes"):
        SparseGPTConfig(sparsity=0.5, structure="neurons", recover_steps=1, recover_iters=10)
    with pytest.raises(InvalidOptionError, match="--recover-schedule sets the steps between gradual prunes"):
        FLSConfig(sparsity=0.5, recover_steps=1, recover_schedule="linear")
    SparseGPTConfig(sparsity=0.5, structure="channels", recover_steps=3, recover_iters=5, recover_schedule="linear")
    with pytest.raises(InvalidOptionError, match="needs --recover-steps"):
        MagnitudeConfig(sparsity=0.5, structure="channels", recover_final_iters=10)
    cfg = MagnitudeConfig(sparsity=0.5, structure="channels", **RECOVER)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("steps", [["1"], ["2", "--recover-iters", "10"]])
def test_cli_structured_recovery_writes_a_smaller_verified_model(cnn, steps):
    out, report = cnn["dir"] / "out.onnx", cnn["dir"] / "r.json"
    proc = run_cli("prune", str(cnn["model"]), "-s", "0.5", "-m", "magnitude", "--structure", "channels",
                   "--recover-steps", *steps, "--recover-final-iters", "20", "--data", str(cnn["calib"]),
                   "-o", str(out), "--report", str(report), "--no-latency")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _inits(onnx.load(out))["c2.w"].shape == (2, 3, 3, 3)
    rep = json.loads(report.read_text())
    assert [r["iters_planned"] for r in rep["recovery"]["steps"]] == [10] * (int(steps[0]) - 1) + [20]
    assert rep["verification"] and rep["structure"]["channels_removed"] == 5


CHANGES = {"recover_final_iters": 30, "recover_lr": 1e-2, "recover_batch_size": 16, "recover_holdout": 0.3,
           "recover_label_weight": 0.5}


@pytest.mark.parametrize("name", sorted(CHANGES) + ["recover_data"])
def test_every_recover_option_changes_the_structured_result(cnn, name):
    base = dict(sparsity=0.5, structure="channels", recover_steps=1, recover_final_iters=40, recover_lr=3e-3)
    value = str(cnn["extra"]) if name == "recover_data" else CHANGES[name]
    a = _inits(compress(cnn["model"], MagnitudeConfig(**base), cnn["calib"], options=OPTS).model)
    b = _inits(compress(cnn["model"], MagnitudeConfig(**{**base, name: value}), cnn["calib"], options=OPTS).model)
    assert any(not np.array_equal(a[n], b[n]) for n in ("c1.w", "c2.w", "fc.w")), name


def _gradual_reference_cases(tmp_path):
    """(model, calib, structure): a one-group MLP (12 tanh neurons) and a torch TransformerEncoderLayer (4 heads)."""
    from tests.test_structured_heads import _data, _encoder, _export

    rng = np.random.default_rng(3)
    mlp = _save(_mlp(rng, hidden=12), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "mlp.npz", x=rng.normal(size=(96, 6)).astype(np.float32))
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    enc = _export(_encoder(), enc_dir / "enc.onnx", ["x"], dynamo=False)
    return {"neurons": (mlp, tmp_path / "mlp.npz"), "heads": (enc, _data(enc_dir, False, n=48))}


@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_gradual_structured_l2_without_fine_tuning_equals_one_shot(tmp_path, structure):
    """L2 norms of the remaining channels / heads do not change when others go, so magnitude in 3 steps with
    no fine-tuning removes exactly the one-shot's set: the composed report names it in the original numbering,
    each step removes what the cubic schedule asks of the original group, and the files are the same."""
    model, calib = _gradual_reference_cases(tmp_path)[structure]
    one = compress(model, MagnitudeConfig(sparsity=0.75, structure=structure), calib, options=OPTS)
    grad = compress(model, MagnitudeConfig(sparsity=0.75, structure=structure, recover_steps=3, recover_iters=0,
                                           recover_final_iters=0), calib, options=OPTS)
    g1, gg = one["structure"]["groups"], grad["structure"]["groups"]
    assert [g["removed"] for g in gg] == [g["removed"] for g in g1] and [g["size"] for g in gg] == [g["size"] for g in g1]
    schedule = sparsity_schedule(0.75, 3)
    assert grad["recovery"]["schedule"] == schedule and len(grad["recovery"]["steps"]) == 3
    for g in gg:
        wanted = [removal_count(g["size"], s) for s in schedule]
        assert g["removed_per_step"] == [b - a for a, b in zip([0] + wanted, wanted)]
        assert sum(g["removed_per_step"]) == g["size"] - g["kept"]
    assert [r["achieved"] for r in grad["recovery"]["steps"]][-1] == pytest.approx(one["sparsity"]["achieved"])
    assert grad["structure"]["tensor_shapes"] == one["structure"]["tensor_shapes"]
    assert grad["structure"]["parameters"] == one["structure"]["parameters"]
    a, b = _inits(grad.model), _inits(one.model)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_gradual_structured_obs_with_distillation(cnn):
    """Structured OBS in 3 steps with fine-tuning after each: the one-shot's tensor shapes, every step's
    held-out loss no worse after its fine-tuning, onnxruntime runs the file, byte-identical reruns."""
    cfg = SparseGPTConfig(sparsity=0.5, structure="channels", recover_steps=3, recover_iters=30, recover_final_iters=60,
                          recover_lr=3e-3)
    rep = compress(cnn["model"], cfg, cnn["calib"], options=OPTS)
    one = compress(cnn["model"], SparseGPTConfig(sparsity=0.5, structure="channels"), cnn["calib"], options=OPTS)
    assert {k: v.shape for k, v in _inits(rep.model).items()} == {k: v.shape for k, v in _inits(one.model).items()}
    rec = rep["recovery"]
    assert [r["step"] for r in rec["steps"]] == [1, 2, 3] and rec["steps"][0]["iters_planned"] == 30
    assert rec["steps"][-1]["iters_planned"] == 60
    assert all(r["heldout_after"] <= r["heldout_before"] for r in rec["steps"])
    assert [r["achieved"] for r in rec["steps"]] == sorted(r["achieved"] for r in rec["steps"])
    assert rec["steps"][-1]["achieved"] == pytest.approx(0.5)
    assert np.isfinite(_run(rep.model, cnn["x"])).all()
    again = compress(cnn["model"], cfg, cnn["calib"], options=OPTS)
    assert again.model.SerializeToString() == rep.model.SerializeToString()


@pytest.mark.parametrize("name,value", [("recover_iters", 5), ("recover_schedule", "linear")])
def test_gradual_structured_step_options_change_the_result(cnn, name, value):
    base = dict(sparsity=0.5, structure="channels", recover_steps=2, recover_iters=30, recover_final_iters=30,
                recover_lr=3e-3)
    a = _inits(compress(cnn["model"], MagnitudeConfig(**base), cnn["calib"], options=OPTS).model)
    b = _inits(compress(cnn["model"], MagnitudeConfig(**{**base, name: value}), cnn["calib"], options=OPTS).model)
    assert any(not np.array_equal(a[n], b[n]) for n in ("c1.w", "c2.w", "fc.w")), name
