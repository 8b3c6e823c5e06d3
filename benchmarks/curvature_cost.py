"""Cost of (re)computing the inverse Fisher: FLS vs oBERT vs M-FAC (the FLS paper's comparison).

Two measurements, each in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own:

* time and peak memory to compute the inverse Fisher from N = 512 / 2048 / 10k samples, batch 16,
  block size 50 for all three (FLS: N/16 auxiliary steps of the block-50 Q; oBERT: N per-example
  gradients folded into block-50 Gram matrices, inverted by Cholesky; M-FAC: N gradients, implicit inverse),
  on a 784-300-50-10 MNIST MLP (~251k weights);
* peak memory vs network size (~500 / 40k / 250k prunable weights) at N = 2048.

Memory is reported as the peak RSS of the worker minus the peak RSS of an identical worker that builds
the model and data but estimates nothing (so Python/torch start-up is excluded). Speed ratios are
computed within one run on one machine.

    python benchmarks/curvature_cost.py --out benchmarks/results [--samples 512,2048,10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"500": (64, 7, 10), "40k": (784, 50, 10), "250k": (784, 300, 50, 10)}
DAMPING = 1e-2


def _problem(size: str, n_data: int, seed: int = 0):
    import numpy as np
    import torch
    from torch import nn

    from fls_compress.curvature.likelihoods import make_likelihood
    from fls_compress.curvature.problem import problem_from_module
    from sample_models.datasets import load_digits_images, load_mnist5k

    torch.manual_seed(seed)
    dims = SIZES[size]
    if dims[0] == 64:
        X, y = load_digits_images()
        X = X.reshape(len(X), -1)
    else:
        X, y = load_mnist5k()
    reps = -(-n_data // len(X))
    X, y = np.tile(X, (reps, 1))[:n_data].astype(np.float32), np.tile(y, reps)[:n_data]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return problem_from_module(nn.Sequential(*layers), X, make_likelihood("categorical"), labels=y, batch_size=16, seed=seed)


def _estimator(method: str, n: int):
    from fls_compress.curvature.empirical_fisher import BlockFisherEstimator
    from fls_compress.curvature.fishleg import FishLegConfig, FishLegEstimator
    from fls_compress.curvature.mfac import MFACEstimator

    if method == "fls":
        return FishLegEstimator(FishLegConfig(form="block", block_size=50, damping=DAMPING, init="identity", fit_steps=max(n // 16, 1), aux_batch=16))
    if method == "fls-kron":  # the Q that `prune --method fls` uses by default: Kronecker form from the K-FAC start
        return FishLegEstimator(FishLegConfig(form="kron", init="kfac", damping=DAMPING, fit_steps=max(n // 16, 1), aux_batch=16))
    if method == "obert":
        return BlockFisherEstimator(num_grads=n, block_size=50, damping=DAMPING)
    if method == "mfac":
        return MFACEstimator(num_grads=n, damping=DAMPING)
    raise ValueError(method)


def worker(method: str, n: int, size: str) -> dict:
    import torch

    torch.set_num_threads(2)
    problem = _problem(size, max(n, 512))
    weights = sum(w.numel for w in problem.weights.values())
    seconds = 0.0
    if method != "baseline":
        est = _estimator(method, n)
        t0 = time.perf_counter()
        stats = est.fit(problem)
        # one inverse-Fisher-vector product per layer, the operation OBS needs
        for name, w in problem.weights.items():
            est.matvec(name, torch.randn_like(w.parameter))
        seconds = time.perf_counter() - t0
        # a FishLeg fit the validation guard rejected leaves Q at its start: the time is then not that of a learned Q
        extra = {k: v for k, v in getattr(stats, "extra", {}).items() if k in ("reverted", "aux_steps_per_s")}
    else:
        extra = {}
    return {"method": method, "samples": n, "size": size, "weights": weights, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def _spawn(method: str, n: int, size: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), size]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "samples": n, "size": size, "error": f"timeout after {timeout:.0f}s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"method": method, "samples": n, "size": size, "error": ("out of memory" if proc.returncode in (-9, 137) else tail)[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "SIZE"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--samples", default="512,2048,10000")
    ap.add_argument("--memory-samples", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    if args.worker:
        method, n, size = args.worker
        print(json.dumps(worker(method, int(n), size)))
        return 0
    methods = ["fls", "obert", "mfac"]
    timing_methods = ["fls", "fls-kron", "obert", "mfac"]
    timing = []
    base = {s: _spawn("baseline", args.memory_samples, s, args.timeout) for s in SIZES}
    for n in [int(s) for s in args.samples.split(",")]:
        base_n = _spawn("baseline", n, "250k", args.timeout)
        for m in timing_methods:
            r = _spawn(m, n, "250k", args.timeout)
            if "peak_rss_mb" in r and "peak_rss_mb" in base_n:
                r["extra_mb"] = r["peak_rss_mb"] - base_n["peak_rss_mb"]
            timing.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    memory = []
    for size in SIZES:
        for m in methods:
            r = _spawn(m, args.memory_samples, size, args.timeout)
            if "peak_rss_mb" in r and "peak_rss_mb" in base[size]:
                r["extra_mb"] = r["peak_rss_mb"] - base[size]["peak_rss_mb"]
            memory.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curvature_cost.json").write_text(json.dumps({"timing": timing, "memory": memory, "baseline": base}, indent=2) + "\n")
    md = render(timing, memory, [int(s) for s in args.samples.split(",")], args.memory_samples)
    (args.out / "curvature_cost.md").write_text(md)
    print(md)
    return 0


def _cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return r["error"]
    return format(r[key], fmt)


def render(timing: list[dict], memory: list[dict], samples: list[int], mem_n: int) -> str:
    def find(rows, **kw):
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)

    lines = [f"Time (s) to compute the inverse Fisher from N samples, batch 16, block 50, 784-300-50-10 MLP (~251k weights), 2 threads:", "",
             "| method | " + " | ".join(str(n) for n in samples) + " |", "|---|" + "---|" * len(samples)]
    names = {"fls": "fls (block-50 Q from I/gamma, N/16 steps)", "fls-kron": "fls (Kronecker Q from K-FAC, N/16 steps; the prune default form)"}
    for m in ("fls", "fls-kron", "obert", "mfac"):
        cells = []
        for n in samples:
            r = find(timing, method=m, samples=n)
            cell = _cell(r, "seconds", ".3f")
            if r and r.get("reverted"):
                cell += " (fit reverted)"
            cells.append(cell)
        lines.append(f"| {names.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "(fit reverted): the fit did not lower the validation auxiliary loss, so Q stayed at its start.",
              "", "Speed-up of FLS (time of the other method / time of FLS, same run; above 1x FLS is faster):", "",
              "| FLS form | vs | " + " | ".join(str(n) for n in samples) + " |", "|---|---|" + "---|" * len(samples)]
    for ref in ("fls", "fls-kron"):
        for m in ("obert", "mfac"):
            cells = []
            for n in samples:
                a, b = find(timing, method=m, samples=n), find(timing, method=ref, samples=n)
                ok = a and b and "seconds" in a and "seconds" in b and b["seconds"] > 0
                cells.append(f"{a['seconds'] / b['seconds']:.1f}x" if ok else "-")
            form = "block-50" if ref == "fls" else "Kronecker (prune default)"
            lines.append(f"| {form} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "Peak extra memory (MB above a worker that only builds model and data), by number of samples N:", "",
              "| method | " + " | ".join(str(n) for n in samples) + " |", "|---|" + "---|" * len(samples)]
    for m in ("fls", "obert", "mfac"):
        lines.append(f"| {m} | " + " | ".join(_cell(find(timing, method=m, samples=n), "extra_mb", ".0f") for n in samples) + " |")
    lines += ["", f"Peak extra memory (MB) vs network size, N = {mem_n}:", "",
              "| method | " + " | ".join(f"{s} ({_w(memory, s)} weights)" for s in SIZES) + " |", "|---|" + "---|" * len(SIZES)]
    for m in ("fls", "obert", "mfac"):
        lines.append(f"| {m} | " + " | ".join(_cell(find(memory, method=m, size=s), "extra_mb", ".0f") for s in SIZES) + " |")
    return "\n".join(lines) + "\n"


def _w(rows: list[dict], size: str) -> str:
    r = next((r for r in rows if r.get("size") == size and "weights" in r), None)
    return str(r["weights"]) if r else "?"


if __name__ == "__main__":
    raise SystemExit(main())
