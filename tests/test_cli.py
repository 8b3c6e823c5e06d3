"""The command line as a pipeline sees it: exit codes, one-line errors, JSON on stdout, files untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer Gemm classifier (16 -> 32 -> 4) with calibration data and labels."""
    d = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(32, 16)).astype(np.float32) / 4
    w2 = rng.normal(size=(4, 32)).astype(np.float32) / 6
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 8
    helper.set_model_props(model, {"owner": "tests"})
    onnx.save(model, d / "mlp.onnx")
    x = rng.normal(size=(200, 16)).astype(np.float32)
    np.savez(d / "calib.npz", x=x, labels=rng.integers(0, 4, size=200))
    bad = x.copy()
    bad[3, 2] = np.nan
    np.savez(d / "nan.npz", x=bad)
    np.savez(d / "shape.npz", x=x[:, :15])
    np.savez(d / "int.npz", x=x.astype(np.int32))
    (d / "corrupt.onnx").write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    unsupported = helper.make_graph(  # Unique is refused by the bridge (LSTM and Det now convert)
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Unique", ["h"], ["y"])],
        "unique",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["U"])],
        [numpy_helper.from_array(np.ones((3, 3), np.float32), "W")],
    )
    m2 = helper.make_model(unsupported, opset_imports=[helper.make_opsetid("", 14)])
    m2.ir_version = 8
    onnx.save(m2, d / "unsupported.onnx")
    return {"dir": d, "model": d / "mlp.onnx"}


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_prune_success_prints_json_and_keeps_input(mlp, tmp_path):
    before = _digest(mlp["model"])
    out = tmp_path / "out.onnx"
    proc = run_cli("prune", str(mlp["model"]), "-o", str(out), "--sparsity", "0.6", "--data", str(mlp["dir"] / "calib.npz"),
                   "--report", str(tmp_path / "r.json"), "--fit-steps", "5", "--refit-steps", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "ok" and report["method"] == "fls"
    assert report["sparsity"]["achieved"] >= 0.6
    assert 0.0 <= report["verification"]["outputs"]["logits"]["top1_agreement"] <= 1.0
    assert _digest(mlp["model"]) == before
    assert [p.key for p in onnx.load(out).metadata_props] == ["owner"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files left behind


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--sparsity", "1.0"], 2, "--sparsity must be < 1.0"),
        (["--sparsity", "-0.1"], 2, "--sparsity must be >= 0.0"),
        (["--sparsity", "nan"], 2, "sparsity must be"),
        (["--pattern", "4:2"], 2, "pattern"),
        (["--method", "nope"], 2, "'nope' is not one of"),
        (["--data", "{dir}/nan.npz"], 5, "NaN"),
        (["--data", "{dir}/shape.npz"], 5, "shape"),
        (["--data", "{dir}/int.npz"], 5, "int"),
        (["--data", "{dir}/missing.npz"], 5, "missing.npz"),
    ],
)
def test_bad_options_and_data_give_one_line_errors(mlp, tmp_path, args, code, fragment):
    args = [a.format(dir=mlp["dir"]) for a in args]
    if "--data" not in args:
        args += ["--data", str(mlp["dir"] / "calib.npz")]
    proc = run_cli("prune", str(mlp["model"]), "-o", str(tmp_path / "o.onnx"), *args, "--fit-steps", "1")
    assert_one_line_error(proc, code, fragment)
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_bad_models_give_one_line_errors(mlp, tmp_path):
    d = mlp["dir"]
    assert_one_line_error(run_cli("prune", str(d / "corrupt.onnx"), "-o", str(tmp_path / "o.onnx")), 3, "corrupt.onnx")
    assert_one_line_error(run_cli("prune", str(d / "absent.onnx"), "-o", str(tmp_path / "o.onnx")), 3, "absent.onnx")
    assert_one_line_error(run_cli("prune", str(d / "unsupported.onnx"), "-o", str(tmp_path / "o.onnx")), 4, "Unique")
    before = _digest(mlp["model"])
    assert_one_line_error(run_cli("prune", str(mlp["model"]), "-o", str(mlp["model"])), 2, "")
    assert _digest(mlp["model"]) == before


def test_inspect_and_verify_commands(mlp, tmp_path):
    proc = run_cli("inspect", str(mlp["model"]))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert [p["name"] for p in info["prunable"]] == ["w1", "w2"]
    assert info["prunable_weights"] == 32 * 16 + 4 * 32 and info["unsupported_ops"] == []
    proc = run_cli("verify", str(mlp["model"]), str(mlp["model"]), "--data", str(mlp["dir"] / "calib.npz"))
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)["verification"]
    assert rep["outputs"]["logits"]["max_abs_error"] == 0.0
    assert rep["outputs"]["logits"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("args, fragment", [
    ([], "no command given"),
    (["prune", "{model}", "--bogus"], "No such option: --bogus"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--likelihood", "poisson"], "'poisson' is not one of"),
    (["prune", "{model}"], "Missing option '--output'"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--steps", "0"], "--steps"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--seed", "-1"], "--seed"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "-m", "sparsegpt", "--fit-steps", "3"], "--fit-steps does not apply to -m sparsegpt"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--damping", "inf"], "--damping must be a finite number"),
    (["prune", "{model}", "-o", "{tmp}/x.onnx", "--report", "{tmp}/x.onnx"], "are the same file"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--report", "{model}"], "would be overwritten"),
    (["prune", "{model}", "-o", "{tmp}/o.onnx", "--data", "{data}", "--report", "{data}"], "would be overwritten"),
    (["verify", "{model}", "{model}", "--report", "{model}"], "would be overwritten"),
])
def test_usage_errors_exit_2_with_one_line(mlp, tmp_path, args, fragment):
    before = _digest(mlp["model"]), _digest(mlp["dir"] / "calib.npz")
    fmt = dict(model=mlp["model"], tmp=tmp_path, data=mlp["dir"] / "calib.npz")
    proc = run_cli(*[a.format(**fmt) for a in args])
    assert_one_line_error(proc, 2, fragment)
    assert (_digest(mlp["model"]), _digest(mlp["dir"] / "calib.npz")) == before
    assert not (tmp_path / "o.onnx").exists()


def test_typer_cli_runner_sees_the_same_commands(mlp):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    assert runner.invoke(app, ["methods"]).exit_code == 0
    res = runner.invoke(app, ["prune", str(mlp["model"]), "-o", "x.onnx", "--bogus"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["prune", "--help"])
    assert res.exit_code == 0 and "FishLeg Surgeon (fls)" in res.output and "--fit-steps" in res.output


def test_quantize_defaults_to_gptq_and_prune_to_fls(mlp, tmp_path):
    """One default table for the CLI and job specs (benchmarks/results/quantize_default.md chose gptq)."""
    from typer.testing import CliRunner

    from cli.main import app
    from fls_compress.configs import FLSConfig, GPTQConfig, config_from_dict

    assert type(config_from_dict({"bits": 8}, command="quantize")) is GPTQConfig
    assert type(config_from_dict({"sparsity": 0.5}, command="prune")) is FLSConfig
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    res = CliRunner().invoke(app, ["quantize", str(mlp["model"]), "-o", str(out), "--bits", "8", "--data",
                                   str(mlp["dir"] / "calib.npz"), "--report", str(rep), "--no-progress", "--no-latency"])
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["method"] == "gptq"


@pytest.mark.slow
def test_failure_after_parsing_still_writes_a_report(mlp, tmp_path):
    rep = tmp_path / "r.json"
    proc = run_cli("prune", str(mlp["model"]), "-o", str(tmp_path / "o.onnx"), "--data", str(mlp["dir"] / "nan.npz"),
                   "--report", str(rep), "--fit-steps", "1")
    assert_one_line_error(proc, 5, "NaN")
    written = json.loads(rep.read_text())
    assert written["status"] == "failed" and written["exit_code"] == 5 and written["error_class"] == "InvalidDataError"
    assert json.loads(proc.stdout) == written  # stdout carries the same JSON
    proc = run_cli("prune", str(mlp["model"]), "-o", str(tmp_path / "o.onnx"), "--aux-lr", "-1", "--report", str(rep))
    assert_one_line_error(proc, 2, "--aux-lr")
    written = json.loads(rep.read_text())
    assert written["status"] == "failed" and written["exit_code"] == 2 and json.loads(proc.stdout) == written
    proc = run_cli("prune", str(mlp["model"]), "-o", str(tmp_path / "o.onnx"), "--data", str(mlp["dir"] / "calib.npz"),
                   "-m", "magnitude", "-s", "0.9", "--min-agreement", "1.0", "--report", str(rep))
    assert proc.returncode == 6
    written = json.loads(rep.read_text())
    assert written["status"] == "failed" and written["exit_code"] == 6 and "verification" in written
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_job_spec_from_config_to_dict_gives_byte_identical_models(mlp, tmp_path):
    from fls_compress import FLSConfig, RunOptions, compress
    from fls_compress.jobspec import make_spec

    config = FLSConfig(sparsity=0.7, fit_steps=5, refit_steps=2, moment_samples=32)
    opts = RunOptions(progress=False, num_calibration=64, threads=1, seed=4)
    outs = []
    for i in range(2):
        spec = make_spec("prune", str(mlp["model"]), str(tmp_path / f"job{i}.onnx"), config, options=opts,
                         data=str(mlp["dir"] / "calib.npz"), report=str(tmp_path / f"job{i}.json"))
        (tmp_path / f"spec{i}.json").write_text(json.dumps(spec))
        proc = run_cli("job", str(tmp_path / f"spec{i}.json"))
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / f"job{i}.onnx").read_bytes())
    assert outs[0] == outs[1]
    direct = tmp_path / "direct.onnx"
    compress(mlp["model"], config, mlp["dir"] / "calib.npz", output=direct, options=opts)
    assert direct.read_bytes() == outs[0]
    r0, r1 = (json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(2))
    for r in (r0, r1):
        r.pop("steps"), r["output"].pop("path")
    assert _without_wall_clock(r0) == _without_wall_clock(r1)


def _without_wall_clock(obj):
    """The report minus fields that measure elapsed time (they differ between identical runs)."""
    timing = ("_s", "_per_s", "seconds", "latency_ms")
    if isinstance(obj, dict):
        return {k: _without_wall_clock(v) for k, v in obj.items() if not k.endswith(timing) and k != "latency"}
    if isinstance(obj, list):
        return [_without_wall_clock(v) for v in obj]
    return obj
