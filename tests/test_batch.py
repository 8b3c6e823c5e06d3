"""fls-compress batch: manifest validation, per-job isolation, resume after a kill, local vs Ray executors.

The jobs are real ``fls-compress job`` subprocesses on tiny ONNX MLPs (magnitude pruning, 32 samples).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fls_compress.batch import JOBS_FAILED_EXIT, ManifestError, load_manifest, run_batch
from fls_compress.batch.keys import config_hash, data_sha256, file_sha256, reusable
from fls_compress.batch.runner import job_command
from fls_compress.batch.summary import read_results, sort_rows, summary_csv
from sample_models.build_samples import export_onnx

REPO = Path(__file__).resolve().parents[1]

MANIFEST = """\
defaults:
  data: calib.npz
  config: {method: magnitude, sparsity: 0.5}
  options: {seed: 0, num_calibration: 32}
jobs:
  - models: "tiny_*.onnx"
    name: "{stem}_m50"
GOOD_EXTRA
"""
BROKEN = """\
  - model: broken.onnx
  - model: tiny_a.onnx
    name: bad_data
    data: bad.npz
"""


def _mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """Two tiny classifiers (widths 16, 32), their data, a truncated model and a NaN data file."""
    d = tmp_path_factory.mktemp("zoo")
    for name, hidden in (("tiny_a", 16), ("tiny_b", 32)):
        export_onnx(_mlp(hidden, hidden), torch.zeros(2, 8), d / f"{name}.onnx", metadata={"task": "classification"})
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    labels = _mlp(16, 16)(torch.from_numpy(x)).argmax(-1).numpy()
    np.savez(d / "calib.npz", input=x, labels=labels)
    bad = x.copy()
    bad[:, 0] = np.nan
    np.savez(d / "bad.npz", input=bad, labels=labels)
    (d / "broken.onnx").write_bytes((d / "tiny_a.onnx").read_bytes()[:200])
    (d / "zoo.yaml").write_text(MANIFEST.replace("GOOD_EXTRA\n", BROKEN))
    (d / "good.yaml").write_text(MANIFEST.replace("GOOD_EXTRA\n", ""))
    return d


@pytest.fixture(scope="module")
def local_run(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, run_batch(zoo / "zoo.yaml", out, workers=2, threads_per_job=1, progress=False)


def _models(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("*/*.onnx"))}


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_expands_globs_defaults_and_relative_paths(zoo):
    m = load_manifest(zoo / "zoo.yaml")
    assert [j.name for j in m.jobs] == ["tiny_a_m50", "tiny_b_m50", "broken", "bad_data"]
    a = m.jobs[0]
    assert a.model == zoo / "tiny_a.onnx" and a.data == zoo / "calib.npz" and a.eval_data is None
    assert m.jobs[3].data == zoo / "bad.npz"  # per-job override of a default
    # configs are normalised by the library (defaults filled in), so equal configs hash equally
    assert a.config["method"] == "magnitude" and a.config["sparsity"] == 0.5 and a.config["scope"] == "global"
    assert a.options["num_calibration"] == 32 and a.options["seed"] == 0
    assert m.validated_configs


def test_manifest_reports_every_error_with_its_line(tmp_path, zoo):
    (tmp_path / "a.onnx").write_bytes((zoo / "tiny_a.onnx").read_bytes())
    text = (
        "defaults:\n"                                      # 1
        "  config: {method: magnitude, sparsity: 0.5}\n"   # 2
        "jobs:\n"                                          # 3
        "  - model: a.onnx\n"                              # 4
        "    colour: red\n"                                # 5
        "  - model: missing.onnx\n"                        # 6
        "  - model: a.onnx\n"                              # 7
        "    config: {sparsity: 1.5}\n"                    # 8
        "    name: second\n"                               # 9
        "  - models: 'nothing_*.onnx'\n"                   # 10
        "  - model: a.onnx\n"                              # 11
        "    command: distil\n"                            # 12
    )
    (tmp_path / "zoo.yaml").write_text(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "zoo.yaml")
    issues = info.value.issues
    assert len(issues) == 5, issues
    assert issues[0].startswith("zoo.yaml:5 jobs[0].colour: unknown key 'colour'")
    assert issues[1].startswith("zoo.yaml:6 jobs[1].model: model file not found")
    assert issues[2].startswith("zoo.yaml:8 jobs[2].config: --sparsity must be")
    assert issues[3] == "zoo.yaml:10 jobs[3].models: glob 'nothing_*.onnx' matches no file"
    assert issues[4].startswith("zoo.yaml:12 jobs[4].command: command must be one of prune, quantize")
    assert info.value.exit_code == 2


def test_json_manifest_errors_have_lines_and_duplicate_names_are_refused(tmp_path, zoo):
    (tmp_path / "a.onnx").write_bytes((zoo / "tiny_a.onnx").read_bytes())
    data = {"jobs": [{"model": "a.onnx"}, {"model": "a.onnx", "options": {"seed": -1}}]}
    (tmp_path / "z.json").write_text(json.dumps(data, indent=1))
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "z.json")
    issues = info.value.issues
    assert issues[0].startswith("z.json:8 jobs[1].options: --seed must be >= 0")
    assert "job name 'a' is also used by z.json:3 jobs[0]" in issues[1]
    (tmp_path / "y.json").write_text('{"jobs": [\n  {"model": "a.onnx",}\n]}')
    with pytest.raises(ManifestError, match=r"y.json:2: invalid JSON"):
        load_manifest(tmp_path / "y.json")


# ---------------------------------------------------------------------------------------------- keys / outputs
def test_resume_keys_and_summary_order(tmp_path, zoo):
    base = config_hash("prune", {"method": "magnitude", "sparsity": 0.5}, {"seed": 0, "progress": True})
    assert base == config_hash("prune", {"sparsity": 0.5, "method": "magnitude"}, {"seed": 0, "progress": False})
    assert base != config_hash("prune", {"method": "magnitude", "sparsity": 0.6}, {"seed": 0})
    assert data_sha256({"data": zoo / "calib.npz"}) != data_sha256({"data": zoo / "bad.npz"})
    rows = [{"name": "b", "status": "ok"}, {"name": "c", "status": "failed", "error": "x"}, {"name": "a", "status": "ok"}]
    assert [r["name"] for r in sort_rows(rows)] == ["c", "a", "b"]
    assert summary_csv(rows).splitlines()[1].startswith("failed,c,")
    (tmp_path / "results.jsonl").write_text(json.dumps({"name": "a", "status": "ok"}) + '\n{"name": "b", "sta')
    assert list(read_results(tmp_path / "results.jsonl")) == ["a"]  # a torn last line is ignored
    assert job_command("/x/spec.json") == [sys.executable, "-m", "cli", "job", "/x/spec.json"]


# ---------------------------------------------------------------------------------------------- batches
@pytest.mark.slow
def test_local_batch_isolates_failures_and_writes_every_output(local_run, zoo):
    out, result = local_run
    rows = {r["name"]: r for r in result.rows}
    assert {n: r["status"] for n, r in rows.items()} == {
        "tiny_a_m50": "ok", "tiny_b_m50": "ok", "broken": "failed", "bad_data": "failed"}
    assert rows["broken"]["exit_code"] == 3 and "cannot read ONNX model" in rows["broken"]["error"]
    assert rows["bad_data"]["exit_code"] == 5 and "NaN" in rows["bad_data"]["error"]
    assert result.exit_code == JOBS_FAILED_EXIT
    ok = rows["tiny_a_m50"]
    assert ok["exit_code"] == 0 and ok["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert ok["input_sha256"] == file_sha256(zoo / "tiny_a.onnx")
    assert ok["output_sha256"] == file_sha256(out / ok["output"]) and ok["output_bytes"] > 0
    for name in rows:
        files = {p.name for p in (out / name).iterdir()}
        assert {"spec.json", "job.log", "report.json"} <= files
        report = json.loads((out / name / "report.json").read_text())
        assert report["status"] == rows[name]["status"]
    # results.jsonl: one row per job, failures first; summary.md lists the failures before the table
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["bad_data", "broken", "tiny_a_m50", "tiny_b_m50"]
    md = (out / "summary.md").read_text()
    assert "4 jobs: 2 ok, 2 failed" in md and md.index("**bad_data**") < md.index("| ok | tiny_a_m50")
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("status,name,command")


@pytest.mark.slow
def test_quantize_job_in_a_batch_gives_the_qdq_model_of_compress(tmp_path, zoo):
    """A quantize job (default prune sparsity overridden by null) yields the same bytes as the library call."""
    import onnx

    from fls_compress import RTNConfig, RunOptions, compress

    text = MANIFEST.replace("GOOD_EXTRA\n", (
        "  - model: tiny_a.onnx\n"
        "    name: a_rtn4\n"
        "    command: quantize\n"
        "    config: {method: rtn, sparsity: null, bits: 4, granularity: 'block:4'}\n"))
    (zoo / "quant.yaml").write_text(text.replace('"tiny_*.onnx"', "tiny_b.onnx"))
    result = run_batch(zoo / "quant.yaml", tmp_path, workers=1, threads_per_job=1, progress=False)
    rows = {r["name"]: r for r in result.rows}
    assert rows["a_rtn4"]["status"] == "ok" and rows["a_rtn4"]["command"] == "quantize"
    produced = tmp_path / rows["a_rtn4"]["output"]
    ops = [n.op_type for n in onnx.load(produced).graph.node]
    assert ops.count("DequantizeLinear") == 2  # both Gemm weights, one scale per 4 input columns
    direct = tmp_path / "direct.onnx"
    compress(zoo / "tiny_a.onnx", RTNConfig(bits=4, granularity="block:4"), zoo / "calib.npz", output=direct,
             options=RunOptions(seed=0, num_calibration=32, threads=1, progress=False))
    assert direct.read_bytes() == produced.read_bytes()


def test_timeout_and_fail_fast(tmp_path, zoo):
    text = (zoo / "good.yaml").read_text().replace('"tiny_*.onnx"', "tiny_*.onnx\n    timeout: 0.2")
    (zoo / "timeout.yaml").write_text(text)
    result = run_batch(zoo / "timeout.yaml", tmp_path, workers=1, fail_fast=True, progress=False)
    rows = {r["name"]: r for r in result.rows}
    assert rows["tiny_a_m50"]["status"] == "timeout" and rows["tiny_a_m50"]["error"] == "timed out after 0.2s"
    assert rows["tiny_b_m50"]["status"] == "skipped" and "--fail-fast" in rows["tiny_b_m50"]["error"]


def _job_processes(spec_fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if spec_fragment in cmdline:
                pids.append(int(proc.name))
    return pids


def test_crashed_job_is_isolated(tmp_path, zoo):
    """A job killed by SIGKILL (as by the OOM killer) is marked crashed; a timed-out one, timeout."""
    (zoo / "crash.yaml").write_text(
        "defaults: {data: calib.npz, config: {method: magnitude}, options: {num_calibration: 32}}\n"
        "jobs:\n  - model: tiny_a.onnx\n  - model: tiny_b.onnx\n    timeout: 0.3\n")
    spec = str(tmp_path / "tiny_a" / "spec.json")

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for pid in _job_processes(spec):
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    result = run_batch(zoo / "crash.yaml", tmp_path, workers=2, progress=False)
    thread.join()
    rows = {r["name"]: r for r in result.rows}
    assert rows["tiny_a"]["status"] == "crashed" and rows["tiny_a"]["exit_code"] == -signal.SIGKILL
    assert rows["tiny_a"]["error"] == "killed by SIGKILL (out of memory?)"
    assert rows["tiny_b"]["status"] == "timeout"


@pytest.mark.slow
def test_killed_batch_resumes_without_redoing_finished_jobs(tmp_path, zoo, local_run):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cli", "batch", str(zoo / "good.yaml"), "-o", str(out), "--workers", "1",
           "--threads-per-job", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        done = {n: r for n, r in read_results(out / "results.jsonl").items() if r["status"] == "ok"}
        if done:
            break
        time.sleep(0.05)
    assert proc.poll() is None and list(done) == ["tiny_a_m50"], "the batch should be half-way"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the running job died with its parent (no orphan keeps writing into the output directory)
    deadline = time.monotonic() + 10
    while _job_processes(str(out / "tiny_b_m50" / "spec.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _job_processes(str(out / "tiny_b_m50" / "spec.json"))
    finished = out / "tiny_a_m50" / "tiny_a_m50.onnx"
    before = finished.stat()

    result = run_batch(zoo / "good.yaml", out, workers=1, threads_per_job=1, progress=False)
    assert result.exit_code == 0 and result.meta["reused"] == 1 and result.meta["to_run"] == 1
    after = finished.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not redone
    assert {r["name"]: r for r in result.rows}["tiny_a_m50"] == done["tiny_a_m50"]
    assert _models(out) == {k: v for k, v in _models(local_run[0]).items() if k in ("tiny_a_m50", "tiny_b_m50")}
    # a third run reuses everything; a changed config re-runs only what changed
    again = run_batch(zoo / "good.yaml", out, workers=1, threads_per_job=1, progress=False)
    assert again.meta["reused"] == 2 and again.meta["to_run"] == 0
    assert reusable(again.rows[0], {k: again.rows[0][k] for k in ("input_sha256", "data_sha256", "config_hash",
                                                                    "tool_version")}, out)


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, zoo, local_run):
    ray = pytest.importorskip("ray", reason="the optional 'ray' extra is not installed")
    assert not ray.is_initialized()
    result = run_batch(zoo / "good.yaml", tmp_path, workers=2, executor="ray", threads_per_job=1, progress=False)
    assert not ray.is_initialized()  # the local instance the batch started was shut down
    local_rows = {r["name"]: r for r in local_run[1].rows}
    for row in result.rows:
        assert row["status"] == "ok"
        ref = local_rows[row["name"]]
        timed = ("speedup_batch1", "speedup_eval_batch", "latency_verdict")  # wall-clock, differs run to run
        assert {k: v for k, v in row["metrics"].items() if k not in timed} == {
            k: v for k, v in ref["metrics"].items() if k not in timed}
        assert all(k in row["metrics"] for k in timed[:2])
        assert row["output_sha256"] == ref["output_sha256"]
        assert all(row[k] == ref[k] for k in ("input_sha256", "data_sha256", "config_hash"))
    assert _models(tmp_path) == {k: v for k, v in _models(local_run[0]).items() if k in ("tiny_a_m50", "tiny_b_m50")}
