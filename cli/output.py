"""Results to stdout (strict JSON), a human summary to stderr."""

from __future__ import annotations

import sys

from fls_compress.report import Report


def emit_report(report: Report) -> None:
    from fls_compress.verification import summarize

    sp = report.get("sparsity")
    q = report.get("quantization")
    if q:
        size = q["size_bytes"]
        print(f"quantize: {report['method']} int{q['bits']} {q['granularity']}: {size['original'] / 1e6:.2f} MB -> "
              f"{size['quantized'] / 1e6:.2f} MB; {q['speed_note']}", file=sys.stderr)
    elif sp:
        total = report.get("timing_s", {}).get("total", 0.0)
        print(f"{report['command']}: {sp['prunable_weights']} weights with {report['method']}: sparsity "
              f"{sp['achieved']:.4f} (target {sp['target']:.4f}) in {total:.1f}s", file=sys.stderr)
    if report.get("verification"):
        print(summarize(report["verification"]), file=sys.stderr)
    kernels = ((report.get("latency") or {}).get("kernels") or {}).get("compressed")
    if kernels:
        integer = ", ".join(f"{k} x{v}" for k, v in kernels["integer_kernels"].items()) or "none"
        floats = ", ".join(f"{k} x{v}" for k, v in kernels["float_layer_kernels"].items()) or "none"
        print(f"kernels onnxruntime runs: integer {integer}; float layers {floats}", file=sys.stderr)
    print(report.to_json())
