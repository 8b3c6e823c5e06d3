"""Run every benchmark and write markdown/JSON/PNG results (``make bench``).

    python benchmarks/run_all.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import curvature_cost, sparsity_sweep  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, not for the committed results)")
    args = ap.parse_args()
    sweep_args = ["--out", str(args.out)]
    cost_args = ["--out", str(args.out)]
    if args.quick:
        sweep_args += ["--sparsities", "0.5,0.9", "--num-calibration", "256"]
        cost_args += ["--samples", "512", "--memory-samples", "512"]
    sparsity_sweep.main(sweep_args)
    curvature_cost.main(cost_args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
