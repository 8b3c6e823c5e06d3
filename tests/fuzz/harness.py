"""What every robustness case checks, and the tiny ONNX models the cases run on.

:func:`cli` calls ``cli.main.run(argv)`` in-process (the console script's own entry point) and captures
the exit code, stdout and stderr; :func:`check_failure` asserts the pipeline contract of a failed run:
the documented exit code, exactly one ``error:`` line and no traceback on stderr, stdout empty or one
strict-JSON failure report, every input file byte-identical, no model at ``-o`` and no temp files or
staging directories left in the output directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]

#: FLS as cheap as it gets (one sub-step, no auxiliary-loss steps): exercises the torch path quickly.
FAST_FLS = ("--fit-steps", "0", "--refit-steps", "0", "--moment-samples", "8", "--steps", "1", "--no-progress")
MAGNITUDE = ("-m", "magnitude", "--no-progress")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (as strict parsers such as ``jq`` do)."""
    return json.loads(text, parse_constant=_reject_constant)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def json(self) -> dict[str, Any]:
        return strict_loads(self.out)


def cli(capsys, *argv: Any) -> Result:
    """Run the console script's entry point in-process; signal handlers are restored afterwards."""
    from cli.main import run

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    logger = logging.getLogger("fls_compress")  # the CLI points it at this test's stderr: undo that after
    log_state = (list(logger.handlers), logger.level, logger.propagate)
    capsys.readouterr()
    code: Any = 0
    try:
        run([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        logger.handlers[:], logger.level, logger.propagate = log_state
    out, err = capsys.readouterr()
    return Result(int(code or 0), out, err)


def run_console(*argv: Any, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    """The installed entry point in a child process (``python -m cli``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(paths: Iterable[Path]) -> dict[Path, str]:
    """sha256 of every file among ``paths`` (directories: every file inside)."""
    found: dict[Path, str] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found.update({c: sha(c) for c in sorted(p.rglob("*")) if c.is_file() and not c.is_symlink()})
        elif p.is_file():
            found[p] = sha(p)
    return found


def stray_files(directory: Path) -> list[str]:
    """Temp files and hidden staging directories a run may have left in ``directory``."""
    if not directory.is_dir():
        return []
    return sorted(n for n in os.listdir(directory) if n.startswith(".") or n.endswith(".tmp"))


def check_failure(res: Result, code: int, fragment: str, *, before: dict[Path, str], output: Path | None = None,
                  report: Path | None = None, report_expected: bool = False) -> dict[str, Any] | None:
    """Assert the failure contract; returns the failure report (from ``report`` or stdout) if any."""
    assert res.code == code, (res.code, res.err[-3000:])
    assert "Traceback" not in res.err, res.err
    assert len(res.errors) == 1, res.err
    assert fragment.lower() in res.errors[0].lower(), res.errors[0]
    after = digests(before)
    assert after == before, "an input file changed"
    if output is not None:
        assert not output.is_file() or output in before, f"{output} was written by a failed run"
        assert stray_files(output.parent) == []
    doc = None
    if res.out.strip():
        doc = res.json()
        assert doc["status"] == "failed" and doc["exit_code"] == code and doc["error"], doc
    if report is not None:
        assert stray_files(report.parent) == []
        if report_expected:
            written = strict_loads(report.read_text())
            assert written["status"] == "failed", written
            assert written["exit_code"] == code and written["error"] and written["error_class"], written
            assert res.errors[0] == f"error: {written['error']}"
            if doc is not None:
                assert doc == written
            doc = written
        elif report not in before:
            assert not report.exists(), f"a report was written to {report}"
    return doc


def check_success(res: Result, output: Path, before: dict[Path, str]) -> dict[str, Any]:
    assert res.code == 0, res.err[-3000:]
    assert res.errors == [] and "Traceback" not in res.err
    doc = res.json()
    assert doc["status"] == "ok"
    assert digests(before) == before, "an input file changed"
    onnx.checker.check_model(str(output))
    assert stray_files(output.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~mask  # not left private like a temp file
    return doc


# ------------------------------------------------------------------------------------------------ models
def finish(graph: onnx.GraphProto, opset: int = 13, extra_domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    model = helper.make_model(graph, opset_imports=imports, producer_name="fuzz")
    model.ir_version = 8
    return model


def mlp(batch: Any = "n", dtype: Any = np.float32, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 16] -> MatMul 16x32 -> Add -> Relu -> MatMul 32x4 -> logits[batch, 4] (a classifier)."""
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = (rng.normal(size=(16, 32)) / 4).astype(dtype)
    w2 = (rng.normal(size=(32, 4)) / 6).astype(dtype)
    b1 = (rng.normal(size=32) / 10).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
         helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2")],
        "mlp", [helper.make_tensor_value_info("x", elem, [batch, 16])],
        [helper.make_tensor_value_info("logits", elem, [batch, 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    return finish(graph)


def linear(dtype: Any) -> onnx.ModelProto:
    """x[n, 8] -> MatMul 8x6 -> Add -> MatMul 6x3 (ops onnxruntime's CPU provider has for fp16 and fp64)."""
    rng = np.random.default_rng(1)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", elem, ["n", 8])], [helper.make_tensor_value_info("y", elem, ["n", 3])],
        [numpy_helper.from_array((rng.normal(size=(8, 6)) / 3).astype(dtype), "w1"),
         numpy_helper.from_array((rng.normal(size=6) / 10).astype(dtype), "b1"),
         numpy_helper.from_array((rng.normal(size=(6, 3)) / 3).astype(dtype), "w2")],
    )
    return finish(graph)


def embedding() -> onnx.ModelProto:
    """Integer token ids[n, 4] -> Gather(E[10, 8]) -> MatMul 8x3 -> ReduceMean over tokens -> y[n, 3]."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["t"]),
         helper.make_node("ReduceMean", ["t"], ["y"], axes=[1], keepdims=0)],
        "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "emb"),
         numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w")],
    )
    return finish(graph)


def two_in_two_out() -> onnx.ModelProto:
    """a[n, 6], b[n, 6] -> (a @ Wa + b @ Wb, relu(a @ Wa))."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "wa"], ["pa"]), helper.make_node("MatMul", ["b", "wb"], ["pb"]),
         helper.make_node("Add", ["pa", "pb"], ["sum"]), helper.make_node("Relu", ["pa"], ["act"])],
        "multi", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 6]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 4]) for n in ("sum", "act")],
        [numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "wa"),
         numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "wb")],
    )
    return finish(graph)


def custom_op() -> onnx.ModelProto:
    """A prunable MatMul followed by an operator of a custom domain nothing can run."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example")],
        "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")],
    )
    return finish(graph, extra_domains=("com.example",))


def no_weights() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    return finish(graph)


def checker_failure() -> onnx.ModelProto:
    """A node reading a value nothing defines (the ONNX checker refuses it)."""
    model = mlp()
    model.graph.node[1].input[1] = "undefined_bias"
    return model
