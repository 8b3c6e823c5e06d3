"""W8A8 options compared on a VALIDATION split of each benchmark model's calibration data.

    python benchmarks/w8a8_validation.py --models wide_mlp,cnn --configs minmax,minmax-noshrink,mse,dynamic

The calibration file of a model of ``benchmarks/latency.py`` is split into its first 75% (given to
``quantize`` as calibration) and the last 25% (validation); every number printed is on the validation
rows, against the dense model run by onnxruntime: relative L2 error of the outputs, mean per-sample
cosine, argmax agreement (classifiers / the MLP). The held-out rows the latency table reports are not
read. ``--fresh N`` (wide MLP, whose inputs are Gaussian) also scores N newly drawn inputs (seed 10_000 +
``--seed``, not the benchmark's rows): argmax agreement over 1024 near-tied outputs needs thousands of rows
to resolve differences of a few 0.1%. ``ort_dynamic`` is onnxruntime's ``quantize_dynamic`` (int8 per-tensor weights) on the same model.
Defaults of ``quantize`` are chosen from these numbers (docs/design/w8a8.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.latency import MODELS, _outputs  # noqa: E402

CONFIGS = {
    "minmax": dict(activations="int8"),
    "minmax-noshrink": dict(activations="int8", hessian_shrinkage="none"),
    "mse": dict(activations="int8", act_calibration="mse"),
    "mse-noshrink": dict(activations="int8", act_calibration="mse", hessian_shrinkage="none"),
    "dynamic": dict(activations="int8-dynamic"),
    "dynamic-noshrink": dict(activations="int8-dynamic", hessian_shrinkage="none"),
    "weights": dict(activations="none"),
    "weights-noshrink": dict(activations="none", hessian_shrinkage="none"),
}


def split(calib: Path, work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    data = dict(np.load(calib))
    n = len(next(iter(data.values())))
    cut = (3 * n) // 4
    path = work / "calib_part.npz"
    np.savez(path, **{k: v[:cut] for k, v in data.items()})
    return path, {k: v[cut:] for k, v in data.items() if k != "labels"}


def score(dense: np.ndarray, out: np.ndarray) -> dict[str, float]:
    a, b = dense.reshape(len(dense), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    q = {"rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a)), "cosine": float(cos.mean())}
    if dense.ndim == 2:
        q["agreement"] = float((dense.argmax(1) == out.argmax(1)).mean())
    return q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="wide_mlp")
    ap.add_argument("--configs", default="minmax,minmax-noshrink")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", type=int, default=0, help="wide_mlp: also score this many freshly drawn inputs")
    args = ap.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fls_compress import GPTQConfig, RunOptions, compress

    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="w8a8-val-") as tmp:
            work = Path(tmp)
            bench = MODELS[name](work, args.seed)
            calib, val = split(bench.calib, work)
            dense = _outputs(bench.model, val)
            fresh = None
            if args.fresh and name == "wide_mlp":
                x = np.random.default_rng(10_000 + args.seed).standard_normal((args.fresh, val["input"].shape[1]))
                fresh = {"input": x.astype(np.float32)}
                fresh_dense = _outputs(bench.model, fresh)

            def scores(path: Path) -> dict[str, float]:
                q = score(dense, _outputs(path, val))
                if fresh is not None:
                    q.update({f"fresh_{k}": v for k, v in score(fresh_dense, _outputs(path, fresh)).items()})
                return q

            quantize_dynamic(str(bench.model), str(work / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
            print(json.dumps({"model": name, "config": "ort_dynamic", **scores(work / "ort_dynamic.onnx")}), flush=True)
            for c in args.configs.split(","):
                out = work / f"{c}.onnx"
                rep = compress(bench.model, GPTQConfig(bits=8, **CONFIGS[c]), calib, output=out,
                               options=RunOptions(seed=args.seed, progress=False, latency=False))
                info = rep.get("method_info", {})
                extra = {k: info[k] for k in ("hessian_shrinkage_mean", "hessian_shrinkage_max") if k in info}
                print(json.dumps({"model": name, "config": c, **scores(out), **extra}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
