"""Recovery (``prune --recover-steps``): cubic schedule, distillation fine-tuning with fixed masks, write-back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fls_compress import FLSConfig, MFACConfig, OBertConfig, RunOptions, compress
from fls_compress.configs import config_from_dict
from fls_compress.errors import InvalidOptionError
from fls_compress.pruning.obs import obs_update
from fls_compress.recovery.distill import Distiller, kl_divergence
from fls_compress.recovery.schedule import sparsity_at, sparsity_schedule

from .conftest import tiny_mlp_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> dict[str, Path]:
    """A 16 -> 32 -> 4 Gemm classifier, its calibration inputs and an extra unlabelled pool."""
    d = tmp_path_factory.mktemp("recover_mlp")
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(32, 16)).astype(np.float32) / 4
    w2 = rng.normal(size=(4, 32)).astype(np.float32) / 6
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.normal(size=32).astype(np.float32) / 10, "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, d / "mlp.onnx")
    x = rng.normal(size=(300, 16)).astype(np.float32)
    labels = np.argmax(x[:, :4], 1)  # any labels: only --recover-label-weight reads them
    np.savez(d / "calib.npz", x=x, labels=labels)
    extra = rng.normal(size=(200, 16)).astype(np.float32)
    np.savez(d / "extra.npz", x=extra, labels=np.argmax(extra[:, :4], 1))
    np.savez(d / "extra_unlabelled.npz", x=extra)
    return {"model": d / "mlp.onnx", "calib": d / "calib.npz", "extra": d / "extra.npz",
            "extra_unlabelled": d / "extra_unlabelled.npz", "dir": d}


BASE = dict(sparsity=0.7, num_grads=32, recover_steps=3, recover_iters=12, recover_final_iters=16, recover_lr=3e-3)


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(mlp, tmp_path: Path, name: str, config=None, **changes) -> tuple[dict, dict[str, np.ndarray]]:
    config = config or MFACConfig(**{**BASE, **changes})
    out = tmp_path / f"{name}.onnx"
    rep = compress(mlp["model"], config, mlp["calib"], output=out, options=RunOptions(seed=0, threads=1, progress=False))
    return rep, _weights(out)


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("final,steps", [(0.9, 1), (0.9, 5), (0.5, 4), (0.95, 10)])
def test_cubic_schedule_is_zhu_gupta_eq1(final, steps):
    targets = sparsity_schedule(final, steps, "cubic")
    expected = [final + (0.0 - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]
    np.testing.assert_allclose(targets, expected, rtol=0, atol=1e-15)
    assert targets[-1] == final and all(a < b for a, b in zip(targets, targets[1:]))
    assert sparsity_at(0, steps, final, 0.2) == pytest.approx(0.2)
    # the cubic schedule front-loads the pruning: ahead of the linear one at every inner step
    linear = sparsity_schedule(final, steps, "linear")
    np.testing.assert_allclose(linear, [final * t / steps for t in range(1, steps + 1)], atol=1e-15)
    assert all(c >= lin for c, lin in zip(targets, linear))


# ----------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_kl_is_zero_at_the_teacher_and_matches_its_closed_form(likelihood):
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    assert float(kl_divergence(likelihood, t, t)) == pytest.approx(0.0, abs=1e-12)
    if likelihood == "categorical":
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        ref = (p * (p.log() - q.log())).sum() / 5
    elif likelihood == "bernoulli":
        p, q = torch.sigmoid(t), torch.sigmoid(s)
        ref = (p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())).sum() / 5
    else:
        ref = 0.5 * ((s - t) ** 2).sum() / 5
    assert float(kl_divergence(likelihood, s, t)) == pytest.approx(float(ref), rel=1e-10)


def test_finetuning_lowers_the_heldout_distillation_loss_and_keeps_masks():
    problem, _ = tiny_mlp_problem("categorical", n=256, sizes=(6, 12, 4))
    distiller = Distiller(problem, "categorical", dict(problem.inputs), targets=None, lr=1e-2, batch_size=32,
                          holdout=0.25, label_weight=0.0, seed=0)
    assert distiller.heldout_loss() == pytest.approx(0.0, abs=1e-12)  # dense == teacher
    # prune 60% by magnitude (no compensation) so there is something to recover
    newly = {}
    for n, w in problem.weights.items():
        a = w.parameter.detach().abs()
        newly[n] = a <= a.flatten().kthvalue(int(0.6 * a.numel())).values

    class Zero:  # the decoupled OBS update with Q = 0: plain zeroing
        def block_exact_update(self, name, weight, prune):
            return torch.zeros_like(weight)

    obs_update(problem, Zero(), newly)
    masks = {n: m.clone() for n, m in problem.masks.items()}
    phase = distiller.finetune(200)
    assert phase.heldout_before > 0
    assert phase.heldout_after < 0.5 * phase.heldout_before
    assert phase.heldout_after == min(c["heldout"] for c in phase.curve)
    for n, w in problem.weights.items():
        assert torch.equal(problem.masks[n], masks[n])
        assert torch.count_nonzero(w.parameter[~masks[n]]) == 0


# ----------------------------------------------------------------------------- end to end
def test_recovery_writes_exact_masks_into_onnx_and_improves_on_plain_gradual(mlp, tmp_path):
    rep, w = _run(mlp, tmp_path, "recovered")
    plain_rep, plain = _run(mlp, tmp_path, "plain", recover_iters=0, recover_final_iters=0)
    original = _weights(mlp["model"])
    total = sum(original[n].size for n in ("w1", "w2"))
    zeros = sum(int((w[n] == 0).sum()) for n in ("w1", "w2"))
    assert zeros == round(0.7 * total)  # exact mask in the written file
    assert sum(int((plain[n] == 0).sum()) for n in ("w1", "w2")) == zeros
    # biases are untouched; surviving weights moved
    np.testing.assert_array_equal(w["b1"], original["b1"])
    assert not np.array_equal(w["w1"], plain["w1"])
    rec = rep["recovery"]
    assert rec["schedule"] == pytest.approx(sparsity_schedule(0.7, 3))
    assert [s["achieved"] for s in rec["steps"]] == pytest.approx(rec["schedule"], abs=2 / total)
    assert all(s["heldout_after"] <= s["heldout_before"] for s in rec["steps"])
    last, plain_last = rec["steps"][-1], plain_rep["recovery"]["steps"][-1]
    assert last["heldout_after"] < plain_last["heldout_after"]
    assert rep["verification"]["outputs"]["logits"]["relative_l2_error"] < \
        plain_rep["verification"]["outputs"]["logits"]["relative_l2_error"]
    assert rec["inputs"]["train"] + rec["inputs"]["heldout"] == rec["inputs"]["calibration"]
    assert "recovery" not in rep["method_info"]


def test_same_seed_gives_byte_identical_models(mlp, tmp_path):
    cfg = FLSConfig(sparsity=0.7, fit_steps=5, refit_steps=2, recover_steps=2, recover_iters=8, recover_final_iters=8)
    paths = []
    for i in range(2):
        out = tmp_path / f"same{i}.onnx"
        compress(mlp["model"], cfg, mlp["calib"], output=out, options=RunOptions(seed=3, threads=1, progress=False))
        paths.append(out.read_bytes())
    assert paths[0] == paths[1]


CHANGES = {
    "recover_steps": 2, "recover_schedule": "linear", "recover_iters": 4, "recover_final_iters": 5, "recover_lr": 1e-2,
    "recover_batch_size": 16, "recover_holdout": 0.3, "recover_label_weight": 0.5,
}


@pytest.mark.parametrize("name", sorted(CHANGES) + ["recover_data"])
def test_every_recover_option_changes_the_result(mlp, tmp_path, name):
    _, base = _run(mlp, tmp_path, "base")
    value = str(mlp["extra"]) if name == "recover_data" else CHANGES[name]
    _, changed = _run(mlp, tmp_path, name, **{name: value})
    assert any(not np.array_equal(base[n], changed[n]) for n in ("w1", "w2")), name


def test_recover_options_are_refused_where_they_do_not_apply(mlp, tmp_path):
    with pytest.raises(InvalidOptionError, match="needs --recover-steps"):
        MFACConfig(sparsity=0.5, recover_lr=1e-3)
    with pytest.raises(InvalidOptionError, match="not both"):
        FLSConfig(sparsity=0.5, steps=2, recover_steps=2)
    with pytest.raises(InvalidOptionError, match="pattern"):
        OBertConfig(pattern="2:4", recover_steps=3)
    with pytest.raises(InvalidOptionError, match="needs --structure"):
        config_from_dict({"method": "sparsegpt", "recover_steps": 2})
    with pytest.raises(InvalidOptionError, match="unknown key"):
        config_from_dict({"method": "wanda", "recover_steps": 2})
    assert config_from_dict(MFACConfig(**BASE).to_dict()) == MFACConfig(**BASE)
    with pytest.raises(InvalidOptionError, match="recover-label-weight needs true targets"):
        _run(mlp, tmp_path, "nolabels", recover_label_weight=0.5, recover_data=str(mlp["extra_unlabelled"]))


@pytest.mark.parametrize("args", [
    ["-m", "magnitude", "--recover-steps", "3"],
    ["-m", "sparsegpt", "--recover-steps", "3"],
    ["-m", "fls", "--recover-lr", "0.01"],
    ["-m", "mfac", "--recover-steps", "0"],
])
def test_cli_refuses_recover_options_with_exit_2(mlp, tmp_path, args):
    proc = subprocess.run([sys.executable, "-m", "cli", "prune", str(mlp["model"]), "-s", "0.5", "-o", str(tmp_path / "o.onnx"),
                           "--data", str(mlp["calib"]), "--report", str(tmp_path / "r.json"), *args],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 2


def test_recover_data_is_guarded_as_an_input(mlp, tmp_path):
    import shutil

    extra = tmp_path / "extra.npz"
    shutil.copy(mlp["extra"], extra)
    before = extra.read_bytes()
    with pytest.raises(InvalidOptionError, match="--recover-data"):
        compress(mlp["model"], MFACConfig(**{**BASE, "recover_data": str(extra)}), mlp["calib"], output=extra,
                 options=RunOptions(seed=0, threads=1, progress=False))
    assert extra.read_bytes() == before
