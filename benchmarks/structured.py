"""Structured pruning (``prune --structure``) on the sample models: quality, parameters, size, onnxruntime latency.

For the sample CNN (``--structure channels``) and the sample autoencoder (``--structure neurons``), at
each sparsity (fraction of every group's channels / neurons removed), magnitude (L2 norm of the
producer's weights, no compensation) against structured OBS (``-m sparsegpt``: greedy block OBS on the
next layer's Hessian with its compensation). Every run goes through :func:`fls_compress.compress` (the
CLI's job: onnxruntime verification included); latency is then re-measured side by side with
:func:`fls_compress.latency.compare_latency` (dense and pruned alternating, same session options and
thread count, warm-up, median) at batch 1 and 64, repeated ``--repeats`` times (the table shows the
median speed-up over repeats and its range). Quality: CNN test accuracy and top-1 agreement with the
dense model, autoencoder test Bernoulli NLL per image, both on the held-out test images (1000); no
knob is tuned here (SparseGPT's damping default), so there is no validation split to choose on.

    make samples && python benchmarks/structured.py --out benchmarks/results
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

MODELS = {
    "cnn": ("mnist_cnn", "channels"),
    "autoencoder": ("mnist_autoencoder", "neurons"),
}


def _latency(original, pruned, test: np.ndarray, name: str, repeats: int, runs: dict[int, int],
             threads: list[int]) -> dict:
    from fls_compress.runtime import set_threads

    out = {}
    for t in threads:
        set_threads(t)  # onnxruntime sessions of compare_latency read it
        out[f"threads_{t}"] = {f"batch_{b}": _latency_at(original, pruned, test, name, b, n, repeats)
                               for b, n in runs.items()}
    return out


def _latency_at(original, pruned, test, name, batch: int, n_runs: int, repeats: int) -> dict:
    """``repeats`` side-by-side comparisons (:func:`fls_compress.latency.compare_latency`: alternating runs,
    same session options): the median of their speed-ups and its range, and the ratio of the two models'
    fastest medians (least disturbed by other jobs on a shared machine)."""
    from fls_compress.latency import compare_latency

    feed = {name: np.ascontiguousarray(test[:batch])}
    reps = [compare_latency(original, pruned, feed, providers=["CPUExecutionProvider"], runs=n_runs, warmup=5)
            for _ in range(repeats)]
    speed = [r["speedup"] for r in reps]
    best_o = min(r["original_median_ms"] for r in reps)
    best_p = min(r["compressed_median_ms"] for r in reps)
    return {
        "speedup_median": float(np.median(speed)), "speedup_min": float(min(speed)), "speedup_max": float(max(speed)),
        "speedup_best": best_o / best_p, "original_ms": float(np.median([r["original_median_ms"] for r in reps])),
        "pruned_ms": float(np.median([r["compressed_median_ms"] for r in reps])), "original_best_ms": best_o,
        "pruned_best_ms": best_p, "runs": n_runs, "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_models", help="where `make samples` put the models")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--methods", default="magnitude,sparsegpt")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=3, help="latency comparisons per row (median speed-up reported)")
    ap.add_argument("--threads", default="1,2", help="onnxruntime intra-op thread counts to time at")
    ap.add_argument("--multiple", type=int, default=8,
                    help="also run the lowest sparsity with --channel-multiple this (0: no such rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import onnx

    from fls_compress import compress
    from fls_compress.configs import RunOptions, config_from_dict
    from fls_compress.structured.report import parameter_count
    from fls_compress.verification import bernoulli_nll

    import onnxruntime as ort

    opts = RunOptions(seed=args.seed, progress=False)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    for key in args.models.split(","):
        stem, structure = MODELS[key]
        model_path = args.samples / f"{stem}.onnx"
        calib, test_path = args.samples / f"{stem}_calib.npz", args.samples / f"{stem}_test.npz"
        if not model_path.exists():
            print(f"error: {model_path} not found; run `make samples` first", file=sys.stderr)
            return 2
        dense = onnx.load(str(model_path))
        test = np.load(test_path)
        name = dense.graph.input[0].name
        x = test[name].astype(np.float32)
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {name: x})[0]

        def quality(out: np.ndarray) -> dict:
            if key == "cnn":
                return {"accuracy": float((out.argmax(1) == test["labels"]).mean()),
                        "agreement": float((out.argmax(1) == ref.argmax(1)).mean())}
            return {"nll": float(bernoulli_nll(out, x).mean())}

        row = {"model": key, "structure": "dense", "method": "-", "sparsity": 0.0, **quality(ref),
               "parameters": parameter_count(dense), "size_bytes": model_path.stat().st_size}
        rows.append(row)
        print(json.dumps(row), flush=True)
        sparsities = [float(s) for s in args.sparsities.split(",")]
        variants = [(s, 1) for s in sparsities] + ([(min(sparsities), args.multiple)] if args.multiple > 1 else [])
        for sparsity, multiple in variants:
            for method in args.methods.split(","):
                spec = {"method": method, "sparsity": sparsity, "structure": structure}
                if multiple > 1:
                    spec["channel_multiple"] = multiple
                config = config_from_dict(spec)
                out_path = tmp / f"{key}_{method}_{sparsity}_{multiple}.onnx"
                t0 = time.perf_counter()
                rep = compress(model_path, config, calib, output=out_path, eval_data=test_path, options=opts)
                made = time.perf_counter() - t0
                pruned = onnx.load(str(out_path))
                psess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
                row = {"model": key, "structure": structure, "method": method, "sparsity": sparsity, "multiple": multiple,
                       "achieved": rep["sparsity"]["achieved"],
                       **quality(psess.run(None, {name: x})[0]),
                       "parameters": parameter_count(pruned), "size_bytes": out_path.stat().st_size,
                       "kept": {g["producer"]: f"{g['kept']}/{g['size']}" for g in rep["structure"]["groups"]},
                       "skipped": rep["structure"]["skipped"], "time_to_make_s": made,
                       "latency": _latency(dense, pruned, x, name, args.repeats, {1: 300, 64: 60},
                                           [int(t) for t in args.threads.split(",")])}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "skipped"}), flush=True)
    _write(args.out, rows, args)
    return 0


def _write(out: Path, rows: list[dict], args) -> None:
    import onnxruntime as ort

    from fls_compress import __version__

    out.mkdir(parents=True, exist_ok=True)
    meta = {"measured_with": __version__, "onnxruntime": ort.__version__, "repeats": args.repeats, "seed": args.seed}
    (out / "structured.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Structured pruning: channels / neurons removed, tensors shrunk (onnxruntime CPU)", "",
        "Sample CNN (`--structure channels`: both convolutions lose that fraction of their output channels; the "
        "Flatten->Gemm input shrinks with them) and sample autoencoder (`--structure neurons`: every hidden Gemm whose "
        "output is not a graph output). `magnitude` = L2 norm of the producer's weights, no compensation; `sparsegpt` = "
        "greedy structured OBS on the next layer's Hessian with its update. Quality on the 1000 test images; latency "
        f"ratio = dense / pruned median time, median over {args.repeats} side-by-side comparisons (range in brackets; in "
        "parentheses the ratio of each model's fastest comparison, least disturbed by other jobs), "
        "batch 1 (300 runs) and 64 (60 runs), at each onnxruntime intra-op thread count, on a 2-core machine that "
        "other jobs shared (ratios within a row are the meaningful part). `(x8: 50%)`: `--channel-multiple 8`, the "
        "kept counts rounded to multiples of 8, and the fraction of channels that removed.", "",
        "| model | structure | method | sparsity | accuracy / NLL | agreement | parameters | size (KB) | "
        + " | ".join(f"speed-up b{b} ({t} thr)" for t in args.threads.split(",") for b in (1, 64))
        + " | time to make (s) | kept |",
        "| --- " * (10 + 2 * len(args.threads.split(","))) + "|",
    ]
    for r in rows:
        qual = f"{r['accuracy']:.3f}" if "accuracy" in r else f"{r['nll']:.2f}"
        agr = f"{r['agreement']:.3f}" if "agreement" in r else ""
        lat = r.get("latency", {})

        def sp(threads: str, batch: int) -> str:
            v = lat.get(f"threads_{threads}", {}).get(f"batch_{batch}")
            if v is None:
                return "1.00"
            return f"{v['speedup_median']:.2f} [{v['speedup_min']:.2f}-{v['speedup_max']:.2f}] ({v['speedup_best']:.2f})"

        kept = ", ".join(f"{k} {v}" for k, v in r.get("kept", {}).items())
        made = f"{r['time_to_make_s']:.1f}" if "time_to_make_s" in r else ""
        target = f"{r['sparsity']:.0%}" + (f" (x{r['multiple']}: {r['achieved']:.0%})" if r.get("multiple", 1) > 1 else "")
        speeds = " | ".join(sp(t, b) for t in args.threads.split(",") for b in (1, 64))
        lines.append(f"| {r['model']} | {r['structure']} | {r['method']} | {target} | {qual} | {agr} | "
                     f"{r['parameters']:,} | {r['size_bytes'] / 1024:.0f} | {speeds} | {made} | {kept} |")
    lines += ["", f"fls-compress {meta['measured_with']}, onnxruntime {meta['onnxruntime']}. "
              "Generated by `benchmarks/structured.py`."]
    (out / "structured.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
