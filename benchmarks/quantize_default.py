"""Which method should ``fls-compress quantize`` use by default? GPTQ vs FLS on validation splits.

Both are OBS column sweeps over the same grid; GPTQ's curvature is each layer's input Hessian
2 X^T X / n (Frantar et al. 2023), FLS's is FishLeg's Kronecker factor of the loss Fisher (fitted first).
On the sample CNN and autoencoder, each calibration file is split in two: the first half calibrates,
the second half validates (the test files that other tables report are not used). Reported: the relative
L2 error of the outputs against the float model, top-1 agreement (CNN) or Bernoulli NLL (autoencoder),
and the wall time of ``compress()``, at 8 and 4 bits (per-channel, symmetric).

    python benchmarks/quantize_default.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("mnist_cnn", "mnist_autoencoder")


def run(samples: Path, work: Path, seed: int) -> list[dict]:
    from benchmarks.latency import _outputs
    from fls_compress import GPTQConfig, RunOptions, compress
    from fls_compress.configs import FLSQuantConfig
    from fls_compress.verification import bernoulli_nll

    rows = []
    for model in MODELS:
        data = dict(np.load(samples / f"{model}_calib.npz"))
        half = len(data["input"]) // 2
        calib = work / f"{model}_calib_half.npz"
        np.savez(calib, **{k: v[:half] for k, v in data.items()})
        x_val = data["input"][half:]
        val = {"input": x_val}  # the sample models' input name
        ref = _outputs(samples / f"{model}.onnx", val)
        for bits in (8, 4):
            for method, config in (("gptq", GPTQConfig(bits=bits)), ("fls", FLSQuantConfig(bits=bits))):
                out = work / f"{model}_{method}_{bits}.onnx"
                t0 = time.perf_counter()
                compress(samples / f"{model}.onnx", config, calib, output=out,
                         options=RunOptions(seed=seed, progress=False, latency=False))
                seconds = time.perf_counter() - t0
                y = _outputs(out, val)
                row = {"model": model, "bits": bits, "method": method, "seconds": seconds,
                       "relative_l2": float(np.linalg.norm(y - ref) / np.linalg.norm(ref))}
                if model == "mnist_cnn":
                    row["agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
                else:
                    row["nll"] = float(bernoulli_nll(y, x_val).mean())
                    row["nll_float"] = float(bernoulli_nll(ref, x_val).mean())
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    lines = ["# quantize: GPTQ vs FLS on validation splits (the default method's evidence)", "",
             "Sample models; calibration on the first half of each calibration file, metrics on the second half "
             "(not the test files). Per-channel symmetric weights, float activations. `seconds`: compress() wall "
             "time on a 2-core machine.", "",
             "| model | bits | method | rel. L2 vs float | agreement / NLL (float NLL) | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        quality = f"{r['agreement']:.4f}" if "agreement" in r else f"{r['nll']:.3f} ({r['nll_float']:.3f})"
        lines.append(f"| {r['model']} | {r['bits']} | {r['method']} | {r['relative_l2']:.5f} | {quality} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_models", help="built by `make samples`")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    missing = [m for m in MODELS if not (args.samples / f"{m}.onnx").exists()]
    if missing:
        print(f"error: sample models missing ({', '.join(missing)}): run `make samples` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fls-quantize-default-") as tmp:
        rows = run(args.samples, Path(tmp), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantize_default.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    md = render(rows)
    (args.out / "quantize_default.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
