"""Pruning cost on a BERT-style encoder: 6 layers, hidden 384, 12 heads, FFN 1536 (BERT-mini/MiniLM size).

The encoder is built in torch from a fixed seed (six separately initialised post-LN
``nn.TransformerEncoderLayer``s, GELU, so the exporter cannot merge equal weights), takes token
embeddings (batch, seq, 384) as input (the 30k x 384 embedding table is not a prunable matmul and is
left out) and returns the hidden states. It is exported to ONNX and pruned through the same job as the
CLI (``fls_compress.pipeline.prune_model``: Gaussian likelihood on the hidden states, onnxruntime
verification on held-out calibration rows). Reported: wall time, achieved sparsity, the output cosine
similarity and relative L2 error vs the dense model, and for FLS the OBS update used per layer.

The weights are random (untrained), so the quality numbers only compare the methods on the same
layer-output reconstruction task; the point of this benchmark is the cost at this width (every layer
uses the column sweep; the former row-exact update needed one dense solve per output row).

    python benchmarks/transformer_encoder.py --out benchmarks/results [--methods fls,sparsegpt] [--fit-steps 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fls_compress.curvature.fishleg import FishLegConfig  # noqa: E402
from fls_compress.pipeline import PruneOptions, prune_model  # noqa: E402
from fls_compress.progress import configure_logging  # noqa: E402

HIDDEN, HEADS, FFN, LAYERS = 384, 12, 1536, 6


class Encoder(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(LAYERS)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def export(path: Path, seq: int, seed: int) -> int:
    enc = Encoder(seed).eval()
    example = torch.randn(2, seq, HIDDEN)
    torch.onnx.export(enc, (example,), path, input_names=["embeddings"], output_names=["hidden"],
                      dynamic_axes={"embeddings": {0: "n"}, "hidden": {0: "n"}}, opset_version=17, dynamo=False)
    return sum(p.numel() for n, p in enc.named_parameters() if p.dim() == 2)


def run(methods: list[str], sparsity: float, fit_steps: int, refit_steps: int, steps: int, num_calibration: int, seq: int, seed: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "encoder.onnx"
        weights = export(model, seq, seed)
        np.savez(tmp / "calib.npz", embeddings=np.random.default_rng(seed).normal(size=(num_calibration, seq, HIDDEN)).astype(np.float32))
        for method in methods:
            cfg = FishLegConfig(fit_steps=fit_steps, refit_steps=refit_steps)
            opts = PruneOptions(sparsity=sparsity, method=method, num_calibration=num_calibration, seed=seed, progress=False,
                                fishleg=cfg, steps=steps if method == "fls" else None, batch_size=32)
            t0 = time.perf_counter()
            rep = prune_model(str(model), str(tmp / f"{method}.onnx"), data=str(tmp / "calib.npz"), options=opts)
            seconds = time.perf_counter() - t0
            out = rep["verification"]["outputs"]["hidden"]
            row = {"method": method, "seconds": seconds, "achieved": rep["sparsity"]["achieved"],
                   "cosine": out.get("cosine_similarity"), "relative_l2": out.get("relative_l2_error"),
                   "method_info": rep.get("method_info", {})}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"weights": weights, "sparsity": sparsity, "fit_steps": fit_steps, "refit_steps": refit_steps, "steps": steps,
            "num_calibration": num_calibration, "seq": seq, "rows": rows}


def render(result: dict) -> str:
    lines = [f"BERT-style encoder ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, FFN {FFN}; {result['weights']} prunable weights), "
             f"{int(result['sparsity'] * 100)}% sparsity, {result['num_calibration']} calibration sequences of {result['seq']} tokens; "
             f"FLS: fit {result['fit_steps']} / refit {result['refit_steps']} steps, {result['steps']} pruning step(s).", "",
             "| method | seconds | achieved sparsity | output cosine | output rel. L2 | OBS update |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        upd = r["method_info"].get("obs_update", "-") if isinstance(r["method_info"], dict) else "-"
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {r['achieved']:.4f} | {r['cosine']:.4f} | {r['relative_l2']:.4g} | {upd} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--methods", default="sparsegpt,fls")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--fit-steps", type=int, default=0)
    ap.add_argument("--refit-steps", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1, help="FLS pruning sub-steps")
    ap.add_argument("--num-calibration", type=int, default=128)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    configure_logging(quiet=True)
    torch.set_num_threads(2)
    result = run(args.methods.split(","), args.sparsity, args.fit_steps, args.refit_steps, args.steps, args.num_calibration, args.seq, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer_encoder.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    (args.out / "transformer_encoder.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
