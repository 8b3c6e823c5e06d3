"""Structured pruning followed by distillation of the smaller graph (``prune --structure ... --recover-steps 1``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from fls_compress import compress
from fls_compress.configs import MagnitudeConfig, RunOptions, SparseGPTConfig, config_from_dict
from fls_compress.errors import InvalidOptionError
from tests.test_cli import run_cli
from tests.test_structured import _bn_cnn, _inits, _run, _save

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
    with pytest.raises(InvalidOptionError, match="must be 1"):
        SparseGPTConfig(sparsity=0.5, structure="channels", recover_steps=3)
    with pytest.raises(InvalidOptionError, match="--recover-iters sets the gradual steps"):
        SparseGPTConfig(sparsity=0.5, structure="neurons", recover_steps=1, recover_iters=10)
    with pytest.raises(InvalidOptionError, match="needs --recover-steps"):
        MagnitudeConfig(sparsity=0.5, structure="channels", recover_final_iters=10)
    cfg = MagnitudeConfig(sparsity=0.5, structure="channels", **RECOVER)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_structured_recovery_writes_a_smaller_verified_model(cnn):
    out, report = cnn["dir"] / "out.onnx", cnn["dir"] / "r.json"
    proc = run_cli("prune", str(cnn["model"]), "-s", "0.5", "-m", "magnitude", "--structure", "channels",
                   "--recover-steps", "1", "--recover-final-iters", "20", "--data", str(cnn["calib"]),
                   "-o", str(out), "--report", str(report), "--no-latency")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _inits(onnx.load(out))["c2.w"].shape == (2, 3, 3, 3)
    rep = json.loads(report.read_text())
    assert rep["recovery"]["steps"][0]["iters_planned"] == 20 and rep["verification"]


CHANGES = {"recover_final_iters": 30, "recover_lr": 1e-2, "recover_batch_size": 16, "recover_holdout": 0.3,
           "recover_label_weight": 0.5}


@pytest.mark.parametrize("name", sorted(CHANGES) + ["recover_data"])
def test_every_recover_option_changes_the_structured_result(cnn, name):
    base = dict(sparsity=0.5, structure="channels", recover_steps=1, recover_final_iters=40, recover_lr=3e-3)
    value = str(cnn["extra"]) if name == "recover_data" else CHANGES[name]
    a = _inits(compress(cnn["model"], MagnitudeConfig(**base), cnn["calib"], options=OPTS).model)
    b = _inits(compress(cnn["model"], MagnitudeConfig(**{**base, name: value}), cnn["calib"], options=OPTS).model)
    assert any(not np.array_equal(a[n], b[n]) for n in ("c1.w", "c2.w", "fc.w")), name
