"""Total FLS prune time at 90% on the MNIST autoencoder, by fit budget and seed, with where the time goes.

Every run is the CLI's job (``fls_compress.compress``) with library defaults except the variant's
overrides, on the default thread count of the machine. Per run: wall time of the whole job, the
prune stage, the FishLeg fits (first fit + refits; ``steps[].fit_seconds`` of the report), auxiliary
steps per second, and the validation / test loss of the written model (validation = 1000 MNIST
training images outside the calibration set, where budgets are compared; test = the held-out images
of the README table). Several seeds per budget, because a fit's end point moves with its probe draws:
budgets closer than the spread across seeds cannot be told apart on one seed.

    python benchmarks/fls_prune_time.py --out benchmarks/results [--seeds 0,1,2] [--variants 0,1]
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

from benchmarks.fls_ablation import _metric, _validation_images  # noqa: E402
from fls_compress import FLSConfig, RunOptions, compress  # noqa: E402
from fls_compress.progress import attach_cli_logging  # noqa: E402

SPARSITY = 0.9
# name -> FLSConfig overrides; the first is the library default
VARIANTS: dict[str, dict] = {
    "default (lr 5e-3, fit 200 / refits 25)": {},
    "former default (lr 1e-2, fit 200 / refits 50)": {"aux_lr": 1e-2, "refit_steps": 50},
    "lr 5e-3, fit 200 / refits 50": {"refit_steps": 50},
    "lr 5e-3, fit 150 / refits 50": {"fit_steps": 150, "refit_steps": 50},
    "lr 5e-3, fit 150 / refits 25": {"fit_steps": 150},
    "fit 50 / refits 20 (v0.1's budget)": {"fit_steps": 50, "refit_steps": 20},
    "no fit (0 / 0)": {"fit_steps": 0, "refit_steps": 0},
    "default, float32 fit matmuls": {"fit_matmul": "float32"},
}


def run(variants: list[str], seeds: list[int]) -> list[dict]:
    samples = ROOT / "sample_models"
    x_val, y_val = _validation_images()
    test = np.load(samples / "mnist_autoencoder_test.npz")
    x_test = test["input"].reshape(len(test["input"]), -1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            for seed in seeds:
                out = Path(tmp) / "pruned.onnx"
                t0 = time.perf_counter()
                rep = compress(samples / "mnist_autoencoder.onnx", FLSConfig(sparsity=SPARSITY, **VARIANTS[name]),
                               samples / "mnist_autoencoder_calib.npz", output=out, options=RunOptions(seed=seed, progress=False))
                seconds = time.perf_counter() - t0
                info = rep["method_info"]
                fits = [s.get("fit_seconds", 0.0) for s in rep["steps"]]
                rows.append({
                    "variant": name, "seed": seed, "config": rep["config"], "seconds": seconds,
                    "prune_seconds": rep["timing_s"]["prune"], "fit_seconds": fits,
                    "aux_steps_per_s": info.get("aux_steps_per_s"), "fit_matmul": info.get("fit_matmul"),
                    "validation_loss": _metric("autoencoder", out, x_val, y_val),
                    "test_loss": _metric("autoencoder", out, x_test, np.zeros(len(x_test), np.int64)),
                })
                r = rows[-1]
                print(f"{name:38s} seed {seed}  val {r['validation_loss']:.3f} test {r['test_loss']:.3f}  prune {r['prune_seconds']:.1f}s "
                      f"(fits {sum(fits):.1f}s)", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [f"FLS at {SPARSITY:.0%} on the MNIST autoencoder (2.83M prunable weights), library defaults except the budget; "
             "2 threads, one run at a time. Times in seconds: the prune stage (fits + OBS selection/updates), of which the "
             "FishLeg fits; the job adds conversion, verification and I/O (v0.1's job took 101.5 s at 50 / 20 steps, "
             "`sparsity_sweep.json` of commit b12add5). Mean (min-max) over seeds.", "",
             "Rows with '-' for the prune/fit split are from the search that chose the default (same job, metrics and "
             "code; only the job's seconds were recorded). The default is the cheapest budget whose validation loss is no worse "
             "than the former default's; 200 / 50 at lr 5e-3 is better on validation at ~1.3x its time.", "",
             "| variant | seeds | validation loss | test loss | job s | prune s | of which fits | aux steps/s | fit matmuls |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(vals: list, digits: int) -> str:
        if any(v is None for v in vals):  # rows of the budget search recorded only the job's seconds
            return "-"
        return f"{np.mean(vals):.{digits}f}" + (f" ({min(vals):.{digits}f}-{max(vals):.{digits}f})" if len(vals) > 1 else "")

    for name in (v for v in VARIANTS if any(r["variant"] == v for r in rows)):
        vr = [r for r in rows if r["variant"] == name]
        sps = [r["aux_steps_per_s"] for r in vr if r["aux_steps_per_s"]]
        lines.append(f"| {name} | {len(vr)} | {fmt([r['validation_loss'] for r in vr], 3)} | {fmt([r['test_loss'] for r in vr], 3)} | "
                     f"{fmt([r['seconds'] for r in vr], 1)} | {fmt([r['prune_seconds'] for r in vr], 1)} | "
                     f"{fmt([None if r['fit_seconds'] is None else sum(r['fit_seconds']) for r in vr], 1)} | "
                     f"{np.mean(sps) if sps else float('nan'):.2f} | {vr[0]['fit_matmul'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="all", help="all, or comma-separated 0-based indices into VARIANTS")
    ap.add_argument("--float32-seeds", default="0", help="seeds for the float32-matmul variant (a timing attribution)")
    args = ap.parse_args(argv)
    attach_cli_logging(quiet=True)
    names = list(VARIANTS) if args.variants == "all" else [list(VARIANTS)[int(i)] for i in args.variants.split(",")]
    rows = []
    for name in names:
        seeds = args.float32_seeds if "float32" in name else args.seeds
        rows += run([name], [int(s) for s in seeds.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fls_prune_time.json"
    if path.exists():  # keep the committed rows of variants not re-run
        rows = [r for r in json.loads(path.read_text()) if r["variant"] not in names] + rows
    rows.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    path.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "fls_prune_time.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
