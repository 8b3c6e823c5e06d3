"""MatMulNBits block size and accuracy_level: CPU time and error on the benchmark models.

    python benchmarks/nbits_choice.py [--models wide_mlp,autoencoder] [--runs 10]

For each model of ``benchmarks/latency.py`` (weights rounded to nearest: the codes do not change the
kernel's speed), 4-bit MatMul/Gemm weights are written as ``com.microsoft.MatMulNBits`` with block size
16/32/64/128 and ``accuracy_level`` 0 (float activations: onnxruntime dequantizes B blocks to float and
runs an fp32 GEMM) or 4 (activations quantized to int8 per block at run time, int8 dot products).
Printed: process CPU seconds per run (median, onnxruntime on one intra-op thread so the calling
process's CPU time is the kernel's, robust to other jobs on the machine) at batch 1 and 64 against the
dense model, and the relative L2 change of the outputs at accuracy_level 4 against accuracy_level 0 (which
computes x @ dequantized codes in float) on 64 calibration rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.latency import MODELS  # noqa: E402


def _session(model: onnx.ModelProto | Path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, o, providers=["CPUExecutionProvider"])


def cpu_ms(sess, feed, runs: int) -> float:
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        sess.run(None, feed)
        times.append(time.process_time() - t0)
    return 1000.0 * float(np.median(times))


def set_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="wide_mlp,autoencoder")
    ap.add_argument("--blocks", default="16,32,64,128")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    from fls_compress.quantize.model import quantize_model

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            bench = MODELS[name](Path(tmp), 0)
            model = onnx.load(bench.model)
            data = {k: v for k, v in np.load(bench.calib).items() if k != "labels"}
            feeds = {b: {k: v[:b] for k, v in data.items()} for b in (1, 64)}
            dense = _session(bench.model)
            base = {b: cpu_ms(dense, f, args.runs) for b, f in feeds.items()}
            print(f"{name}: dense cpu ms b1 {base[1]:.3f} b64 {base[64]:.3f}", flush=True)
            for block in (int(b) for b in args.blocks.split(",")):
                q, info = quantize_model(model, None, method="rtn", bits=4, granularity=f"block:{block}")
                exact = _session(set_level(q, 0)).run(None, feeds[64])[0].astype(np.float64)  # float products
                for level in (0, 4):
                    s = _session(set_level(q, level))
                    out = s.run(None, feeds[64])[0].astype(np.float64)
                    err = np.linalg.norm(out - exact) / np.linalg.norm(exact)
                    ms = {b: cpu_ms(s, f, args.runs) for b, f in feeds.items()}
                    print(f"  block {block:3d} accuracy_level {level}: cpu ms b1 {ms[1]:.3f} ({base[1] / ms[1]:.2f}x) "
                          f"b64 {ms[64]:.3f} ({base[64] / ms[64]:.2f}x), rel. change vs level 0 "
                          f"{err:.2e}, MatMulNBits {info['matmul_nbits']:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
