"""One-shot test loss vs sparsity for every pruning method on the MNIST autoencoder sample model.

Every method runs through the same job as the CLI (`fls_compress.compress`): same
calibration samples, same write-back, same onnxruntime verification on the 1000 held-out test images.
The metric is the test reconstruction loss (Bernoulli NLL summed over pixels, mean over images) of the
pruned ONNX model as onnxruntime computes it.

    python benchmarks/sparsity_sweep.py --out benchmarks/results [--methods fls,magnitude] [--sparsities 0.5,0.7]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fls_compress import MagnitudeConfig, RunOptions, compress, config_from_dict  # noqa: E402
from fls_compress.errors import FlsError  # noqa: E402
from fls_compress.progress import attach_cli_logging  # noqa: E402

DEFAULT_METHODS = ["magnitude", "magnitude-layer", "wanda", "sparsegpt", "obert", "mfac", "ief", "fls"]
DEFAULT_SPARSITIES = [0.5, 0.7, 0.8, 0.9]


def run_sweep(model: Path, calib: Path, test: Path, methods: list[str], sparsities: list[float], num_calibration: int, seed: int,
              threads: int | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for s in sparsities:
                opts = RunOptions(num_calibration=num_calibration, seed=seed, threads=threads, progress=False)
                if method == "magnitude-layer":
                    config = MagnitudeConfig(sparsity=s, scope="layer")
                else:
                    config = config_from_dict({"method": method, "sparsity": s})
                t0 = time.perf_counter()
                try:
                    rep = compress(model, config, calib, output=Path(tmp) / f"{method}_{s}.onnx", eval_data=test, options=opts)
                except FlsError as exc:
                    rows.append({"method": method, "sparsity": s, "error": str(exc)})
                    print(f"{method:16s} {s:.2f}  failed: {exc}", file=sys.stderr, flush=True)
                    continue
                out = rep["verification"]["outputs"]["logits"]
                rows.append({
                    "method": method,
                    "sparsity": s,
                    "achieved_sparsity": rep["sparsity"]["achieved"],
                    "test_loss": out["bernoulli_nll_compressed"],
                    "dense_test_loss": out["bernoulli_nll_original"],
                    "test_mse": out["mse_compressed"],
                    "seconds": time.perf_counter() - t0,
                    "threads": threads,
                })
                print(f"{method:16s} {s:.2f}  test loss {out['bernoulli_nll_compressed']:.3f}  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], sparsities: list[float]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    dense = next((r["dense_test_loss"] for r in rows if "dense_test_loss" in r), float("nan"))
    lines = [
        f"Test reconstruction loss (Bernoulli NLL per image, onnxruntime; dense model: {dense:.3f}). Lower is better; best per column in bold.",
        "",
        "| method | " + " | ".join(f"{int(s * 100)}%" for s in sparsities) + " |",
        "|---|" + "---|" * len(sparsities),
    ]
    best = {s: min((r["test_loss"] for r in rows if r["sparsity"] == s and "test_loss" in r), default=None) for s in sparsities}
    for m in methods:
        cells = []
        for s in sparsities:
            r = next((r for r in rows if r["method"] == m and r["sparsity"] == s), None)
            if r is None or "test_loss" not in r:
                cells.append("failed" if r else "-")
            else:
                txt = f"{r['test_loss']:.2f}"
                cells.append(f"**{txt}**" if best[s] is not None and r["test_loss"] == best[s] else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["sparsity"], r["test_loss"]) for r in rows if r["method"] == m and "test_loss" in r)
        if pts:
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=m, linewidth=2.5 if m == "fls" else 1.2)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test loss (Bernoulli NLL / image)")
    ax.set_yscale("log")
    ax.set_title("MNIST autoencoder, one-shot pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _version() -> str:
    """The tool version and commit the rows were measured with."""
    import subprocess

    from fls_compress import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return f"{__version__} ({commit})" if commit else __version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--sparsities", default=",".join(str(s) for s in DEFAULT_SPARSITIES))
    ap.add_argument("--num-calibration", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads per run (default: all cores)")
    ap.add_argument("--merge", action="store_true",
                    help="re-measure only --methods and keep the other methods' rows of the existing results")
    args = ap.parse_args(argv)
    attach_cli_logging(quiet=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = run_sweep(
        args.samples / "mnist_autoencoder.onnx", args.samples / "mnist_autoencoder_calib.npz", args.samples / "mnist_autoencoder_test.npz",
        args.methods.split(","), sparsities, args.num_calibration, args.seed, args.threads,
    )
    measured_with = _version()
    for r in rows:
        r["measured_with"] = measured_with
    args.out.mkdir(parents=True, exist_ok=True)
    existing = args.out / "sparsity_sweep.json"
    if args.merge and existing.exists():
        redone = set(args.methods.split(","))
        rows = [r for r in json.loads(existing.read_text()) if r["method"] not in redone] + rows
    (args.out / "sparsity_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "sparsity_sweep.md").write_text(markdown(rows, sparsities))
    plot(rows, args.out / "sparsity_sweep.png")
    print(markdown(rows, sparsities))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
