"""Where does W8A8's error on the wide MLP come from? A numpy simulation on a validation split.

    python benchmarks/w8a8_diagnosis.py [--seed 0] [--calib 384]

The benchmark's wide MLP (``prepare_wide_mlp`` in ``benchmarks/latency.py``: 1024-4096-4096-1024, ReLU,
torch default init, Gaussian inputs) is rebuilt; its 512 calibration rows are split into the first
``--calib`` rows (ranges, Hessians) and the rest (validation: every number printed here). The held-out
rows the latency table reports are never read.

Each configuration quantizes weights and/or activations exactly as onnxruntime's integer kernels compute
them (uint8 asymmetric activations per tensor, round half to even, int8 symmetric weights; the int32
accumulation of integer codes is exact, so float64 products of dequantized values equal it), and prints
the relative L2 error and mean cosine of the final output against the float model, plus the argmax
agreement, over the validation rows (batches of 64, the batch dynamic ranges are taken over).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fls_compress.quantize.gptq import gptq_quantize_matrix  # noqa: E402
from fls_compress.quantize.grid import Grid, QuantSpec  # noqa: E402

BATCH = 64
VARIANTS = (("OAS shrinkage", {"shrink": True}), ("OAS centered", {"shrink": "centered"}))


def load_mlp(seed: int):
    from benchmarks.latency import prepare_wide_mlp

    work = Path(tempfile.mkdtemp(prefix="w8a8-diag-"))
    bench = prepare_wide_mlp(work, seed)
    m = onnx.load(bench.model)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    layers = []
    for node in m.graph.node:
        if node.op_type == "Gemm":
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            w = inits[node.input[1]]
            layers.append((w if trans else w.T, inits[node.input[2]]))  # (out, in), bias
    return layers, np.load(bench.calib)["input"].astype(np.float64)


def q_act(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 asymmetric per-tensor quantize-dequantize (onnxruntime QuantizeLinear / DynamicQuantizeLinear)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    z = np.clip(np.round(-lo / float(s)), 0, 255)
    return (np.clip(np.round(x / float(s)) + z, 0, 255) - z) * float(s)


def forward(layers, x, acts=None, ranges=None):
    """Float or fake-quantized forward; ``acts`` 'static' (``ranges`` per layer), 'dynamic' (per batch) or None;
    returns the output and the inputs each layer saw."""
    seen = []
    for i, (w, b) in enumerate(layers):
        if acts == "static" and ranges[i] is not None:
            x = q_act(x, *ranges[i])
        elif acts == "dynamic":
            x = np.concatenate([q_act(c, c.min(), c.max()) for c in np.array_split(x, max(1, len(x) // BATCH))])
        seen.append(x)
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x, seen


def searched_ranges(cal_in, layers, weighted: bool, alphas=np.linspace(1.0, 0.5, 26)):
    """Per layer, the range alpha * [min, max] that minimises ||Q(X) - X||^2 (or ||(Q(X) - X) W^T||^2)."""
    out = []
    for x, (w, _) in zip(cal_in, layers):
        lo, hi = float(x.min()), float(x.max())
        g = w.T @ w if weighted else None
        errs = []
        for a in alphas:
            d = q_act(x, a * lo, a * hi) - x
            errs.append(float(((d @ g) * d).sum()) if weighted else float((d * d).sum()))
        a = alphas[int(np.argmin(errs))]
        print(f"    {'output-weighted' if weighted else 'activation'} MSE range: alpha {a:.2f}", flush=True)
        out.append((a * lo, a * hi))
    return out


def metrics(ref, out):
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return np.linalg.norm(out - ref) / np.linalg.norm(ref), cos.mean(), (ref.argmax(1) == out.argmax(1)).mean()


def w_rtn(w, granularity="channel"):
    g = Grid.fit(w, QuantSpec(8, True, granularity))
    return g.quantize(w).astype(np.float64)


def oas(h: np.ndarray, n: int) -> np.ndarray:
    """Oracle-approximating shrinkage of a second-moment matrix from n rows (Chen et al. 2010, eq. 23)."""
    p = h.shape[0]
    tr, tr2 = np.trace(h), float((h * h).sum())
    rho = min(1.0, ((1 - 2 / p) * tr2 + tr * tr) / ((n + 1 - 2 / p) * (tr2 - tr * tr / p)))
    return (1 - rho) * h + rho * tr / p * np.eye(p), rho


def oas_centered(x: np.ndarray) -> np.ndarray:
    """E[x x^T] = C + mu mu^T with only the covariance C shrunk (OAS); the mean kept."""
    mu = x.mean(0)
    c, rho = oas((x - mu).T @ (x - mu) / len(x), len(x))
    return c + np.outer(mu, mu), rho


def w_gptq(w, x, shrink=False, percdamp=0.01):
    h = 2.0 * x.T @ x / len(x)
    if shrink == "centered":
        h, rho = oas_centered(x)
        print(f"    OAS(centered) rho {rho:.3f}", flush=True)
    elif shrink:
        h, rho = oas(h, len(x))
        print(f"    OAS rho {rho:.3f}", flush=True)
    h = torch.from_numpy(h)
    g = Grid.fit(w, QuantSpec(8, True, "channel"))
    return gptq_quantize_matrix(torch.from_numpy(w), h, g, percdamp=percdamp).weight.numpy().astype(np.float64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=384)
    ap.add_argument("--gptq", action="store_true", help="also run GPTQ variants (slow: minutes)")
    args = ap.parse_args(argv)
    layers, data = load_mlp(args.seed)
    cal, val = data[: args.calib], data[args.calib:]
    ref, _ = forward(layers, val)
    _, cal_in = forward(layers, cal)
    minmax = [(float(x.min()), float(x.max())) for x in cal_in]
    rows = {}

    def report(name, out):
        rows[name] = metrics(ref, out)
        print(f"{name:58s} relL2 {rows[name][0]:.5f}  cos {rows[name][1]:.6f}  agree {rows[name][2]:.4f}", flush=True)

    def with_weights(ws):
        return [(w, b) for w, (_, b) in zip(ws, layers)]

    rtn = [w_rtn(w) for w, _ in layers]
    rtn_t = [w_rtn(w, "tensor") for w, _ in layers]
    report("weights RTN per-channel only", forward(with_weights(rtn), val)[0])
    report("weights RTN per-tensor only", forward(with_weights(rtn_t), val)[0])
    report("activations static minmax only", forward(layers, val, "static", minmax)[0])
    report("activations dynamic per batch only", forward(layers, val, "dynamic")[0])
    for i in range(len(layers)):
        only = [r if j == i else None for j, r in enumerate(minmax)]
        report(f"  activation of layer {i} static minmax only", forward(layers, val, "static", only)[0])
        ws = [rtn[j] if j == i else layers[j][0] for j in range(len(layers))]
        report(f"  weights of layer {i} RTN per-channel only", forward(with_weights(ws), val)[0])
    print("  static ranges", [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in minmax])
    dyn = [(float(x[:BATCH].min()), float(x[:BATCH].max())) for x in forward(layers, val)[1]]
    print("  dynamic ranges of the first validation batch", [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in dyn])
    report("quantize_dynamic (RTN per-tensor, dynamic acts)", forward(with_weights(rtn_t), val, "dynamic")[0])
    report("RTN per-channel + static minmax", forward(with_weights(rtn), val, "static", minmax)[0])
    report("RTN per-channel + dynamic", forward(with_weights(rtn), val, "dynamic")[0])
    mse = searched_ranges(cal_in, layers, False)
    report("activations static MSE ranges only", forward(layers, val, "static", mse)[0])
    report("RTN per-channel + static MSE ranges", forward(with_weights(rtn), val, "static", mse)[0])
    wmse = searched_ranges(cal_in, layers, True)
    report("activations static output-MSE ranges only", forward(layers, val, "static", wmse)[0])
    report("RTN per-channel + static output-MSE ranges", forward(with_weights(rtn), val, "static", wmse)[0])
    if args.gptq:
        g_float = []
        x = cal
        for w, b in layers:  # sequential GPTQ on the float inputs of the already-quantized prefix
            g_float.append(w_gptq(w, x))
            x = np.maximum(x @ g_float[-1].T + b, 0.0)
        report("GPTQ (float inputs) only", forward(with_weights(g_float), val)[0])
        report("GPTQ (float inputs) + static minmax", forward(with_weights(g_float), val, "static", minmax)[0])
        report("GPTQ (float inputs) + dynamic", forward(with_weights(g_float), val, "dynamic")[0])
        for label, kw in VARIANTS:
            g_s = []
            x = cal
            for w, b in layers:
                g_s.append(w_gptq(w, x, **kw))
                x = np.maximum(x @ g_s[-1].T + b, 0.0)
            report(f"GPTQ ({label}) only", forward(with_weights(g_s), val)[0])
            report(f"GPTQ ({label}) + static minmax", forward(with_weights(g_s), val, "static", minmax)[0])
            report(f"GPTQ ({label}) + dynamic", forward(with_weights(g_s), val, "dynamic")[0])
            report(f"GPTQ ({label}) + static MSE ranges", forward(with_weights(g_s), val, "static", mse)[0])
            report(f"GPTQ ({label}) + static output-MSE ranges", forward(with_weights(g_s), val, "static", wmse)[0])
        g_q = []
        x = cal
        for i, (w, b) in enumerate(layers):  # GPTQ on the quantized inputs the integer layer really sees
            xq = q_act(x, *minmax[i])
            g_q.append(w_gptq(w, xq))
            x = np.maximum(xq @ g_q[-1].T + b, 0.0)
        report("GPTQ (quantized inputs) + static minmax", forward(with_weights(g_q), val, "static", minmax)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
