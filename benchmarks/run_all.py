"""Run every benchmark and write its markdown/JSON/PNG results (``make bench``).

    python benchmarks/run_all.py --out benchmarks/results [--only sparsity_sweep,fls_ablation]

Each benchmark runs in its own process, one after the other (wall times are only comparable when
nothing else shares the cores). A full run takes several hours on 2 CPU cores; every script can also
be run alone (see its docstring).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = [
    "sparsity_sweep",       # test loss vs sparsity, every pruning method, MNIST autoencoder
    "fls_ablation",         # what FishLeg's learned Q adds: start x fit x OBS update
    "fishleg_convergence",  # Q's error vs the exact damped inverse Fisher, vs steps and lr
    "fls_prune_time",       # total FLS prune time at 90% on the autoencoder by fit budget and seed
    "curvature_cost",       # inverse-Fisher cost: FLS vs oBERT vs M-FAC (time, memory)
    "transformer_encoder",  # pretrained MiniLM-L6 encoder (22M params) on real text: every method at 50/70%, time, RSS, agreement
    "layerwise_rows",       # activation-row subsampling of the layer-wise methods on big feature maps
    "recovery",             # one-shot vs gradual vs gradual + distillation fine-tuning (--recover-steps), AE and CNN at 80/90/95%
    "quantize_accuracy",    # int8/int4 RTN vs GPTQ vs FLS quantization
    "batch_scaling",        # the sample zoo through `batch` with 1 and 2 workers
    "structured",           # prune --structure channels/neurons: quality, parameters, size, onnxruntime latency
    "structured_coverage",  # which exported architectures --structure channels can shrink (torchvision, paddle2onnx, tf2onnx-style)
    "quantize_default",     # the default quantize method: GPTQ vs FLS on validation splits (sample CNN, autoencoder)
    "gptq_rows",            # GPTQ output error vs activation rows per layer (PP-OCRv4 detector, byte classifier, CNN), 8/4 bits
    "quantize_cost",        # W8A8 quantize time (wall/CPU per stage) vs onnxruntime quantize_static: byte-classifier look-alike, wide MLP
    "latency",              # dense vs our W8A8 / int4 MatMulNBits vs onnxruntime quantize_static/dynamic vs 2:4: quality, size, speed-up b1/b64
]

#: further runs of a benchmark with other arguments (each one process after the default run, same --out)
EXTRA_RUNS: dict[str, list[list[str]]] = {
    "recovery": [  # structured: one-shot, gradual without fine-tuning, gradual + distillation (4 steps), 1 step + distillation
        ["--structured", "--methods", "sparsegpt", "--sparsities", "0.5,0.7,0.85", "--variants", "0,1,2", "--recover-steps", "4"],
        ["--structured", "--methods", "sparsegpt", "--sparsities", "0.5,0.7,0.85", "--variants", "2", "--recover-steps", "1",
         "--tag", "1 step"],
    ],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = ap.parse_args(argv)
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    failed = []
    for name in chosen:
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        for extra in [[]] + EXTRA_RUNS.get(name, []):
            proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(args.out), *extra],
                                  cwd=ROOT)
            print(f"== {name} {' '.join(extra)}: exit {proc.returncode} after {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
            if proc.returncode and name not in failed:
                failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
