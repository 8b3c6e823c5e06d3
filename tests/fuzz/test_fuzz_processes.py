"""What needs a real process: signals mid-run, concurrent runs on one output, a full disk, the entry point."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time

import onnx
import pytest

from . import harness as h


def _start(*argv, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(h.ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_leaves_no_output_and_a_report(files, tmp_path, signum, code):
    """The signal arrives while FishLeg fits (after the data was loaded): no model, no temp files,
    one error line, the failure report at --report and on stdout."""
    before = h.digests([files["dir"]])
    out_dir = tmp_path / "out ✓"
    out, rep = out_dir / "o.onnx", out_dir / "r.json"
    proc = _start("-v", "prune", files["mlp"], "-o", out, "--report", rep, "--data", files["calib"], "--fit-steps", "1000000",
                  "--moment-samples", "8", "--no-progress")
    err_lines: list[str] = []
    started = threading.Event()

    def pump() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            err_lines.append(line)
            if "calibration samples" in line:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not started.wait(120):
        proc.kill()
        pytest.fail("the run never reached calibration: " + "".join(err_lines))
    time.sleep(1.0)  # well inside the million auxiliary-loss steps
    proc.send_signal(signum)
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.wait(60) == code, "".join(err_lines)
    reader.join(10)
    err = "".join(err_lines)
    res = h.Result(proc.returncode, stdout, err)
    doc = h.check_failure(res, code, f"interrupted by {signal.Signals(signum).name}", before=before, output=out,
                          report=rep, report_expected=True)
    assert doc["error_class"] == "Interrupted"
    assert sorted(os.listdir(out_dir)) == ["r.json"]


@pytest.mark.slow
def test_concurrent_runs_on_one_output_leave_one_complete_model(capsys, files, tmp_path):
    """Three runs with different targets race to one -o: each exits 0, the file is exactly one of the three
    models (never a mix or a truncated file), and no staging directories or temp files remain."""
    before = h.digests([files["dir"]])
    refs = {}
    for s in ("0.3", "0.5", "0.7"):
        ref = tmp_path / f"ref{s}.onnx"
        res = h.cli(capsys, "prune", files["mlp"], "-o", ref, "--data", files["calib"], "-s", s, *h.MAGNITUDE)
        assert res.code == 0, res.err
        refs[s] = ref.read_bytes()
    shared = tmp_path / "shared ✓"
    out = shared / "o.onnx"
    rep = shared / "r.json"  # one report path for all three, too
    procs = [_start("prune", files["mlp"], "-o", out, "--report", rep, "--data", files["calib"], "-s", s, *h.MAGNITUDE)
             for s in refs]
    results = [(p.communicate(timeout=300), p.returncode) for p in procs]
    for (stdout, stderr), rc in results:
        assert rc == 0, stderr
        assert h.strict_loads(stdout)["status"] == "ok"
    assert out.read_bytes() in refs.values()
    onnx.checker.check_model(str(out))
    final = h.strict_loads(rep.read_text())  # one complete report, from one of the runs
    assert final["status"] == "ok" and f"{final['sparsity']['target']:.1f}" in refs
    assert sorted(os.listdir(shared)) == ["o.onnx", "r.json"]
    assert h.digests(before) == before


def _tiny_disk() -> None:
    """Child-process setup: files may not grow past 1 KiB (EFBIG, as on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_full_disk_is_exit_7_and_leaves_nothing(files, tmp_path):
    before = h.digests([files["dir"]])
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = _start("prune", files["mlp"], "-o", out, "--report", rep, "--data", files["calib"], *h.MAGNITUDE,
                  preexec_fn=_tiny_disk)
    stdout, stderr = proc.communicate(timeout=300)
    res = h.Result(proc.returncode, stdout, stderr)
    doc = h.check_failure(res, 7, "cannot write", before=before, output=out)
    assert doc is not None and doc["error_class"] == "OutputError"  # the report reaches stdout at least
    assert sorted(os.listdir(tmp_path)) in ([], ["r.json"])
    if rep.exists():
        assert h.strict_loads(rep.read_text())["exit_code"] == 7


@pytest.mark.slow
def test_entry_point_usage_error_and_success(files, tmp_path):
    proc = h.run_console("prune", files["mlp"], "-o", tmp_path / "o.onnx", "--sparsity", "nan", "--report", tmp_path / "r.json")
    res = h.Result(proc.returncode, proc.stdout, proc.stderr)
    h.check_failure(res, 2, "--sparsity", before=h.digests([files["dir"]]), output=tmp_path / "o.onnx",
                    report=tmp_path / "r.json", report_expected=True)
    proc = h.run_console("prune", files["unicode"], "-o", tmp_path / "ø ü.onnx", "--data", files["calib"], *h.MAGNITUDE)
    assert proc.returncode == 0 and h.strict_loads(proc.stdout)["status"] == "ok", proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["r.json", "ø ü.onnx"]
