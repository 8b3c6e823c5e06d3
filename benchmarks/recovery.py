"""Recovery: one-shot OBS vs gradual OBS vs gradual OBS + distillation fine-tuning (``prune --recover-steps``).

Every row is one ``fls_compress.compress`` run (the CLI's job), timed end to end, on the sample models of
``make samples``:

* **one-shot**: the method's default (4 sub-steps with refits, no fine-tuning);
* **gradual, no fine-tuning**: ``--recover-steps T --recover-iters 0 --recover-final-iters 0`` (the cubic
  schedule of Zhu & Gupta 2017 alone, each step one OBS step with FishLeg's Q refitted warm);
* **gradual + distillation**: the default recovery recipe, distilling the dense model's outputs on the
  calibration inputs only;
* **gradual + distillation + pool**: the same with ``--recover-data`` = unlabelled MNIST *training* images
  that are neither calibration nor validation images (never test images).

Data, identical for every row unless the row says otherwise: ``--data`` = the 1024 calibration images of
``sample_models/`` (of which ``compress`` holds out a seeded 20% for its own verification, as in
``fls_ablation.py``, so 819 calibrate); the recovery's early stopping holds out a seeded 10% of its
distillation inputs. Two measured sets, onnxruntime on the written ONNX file:

* **validation**: training images 1024..2023 (outside the calibration set); the recipe's defaults were
  chosen on this column only;
* **test**: the 1000 test images of ``sample_models/``.

The unlabelled pool is training images 2024..3999 (1976 images). Autoencoder: Bernoulli NLL per image; CNN:
cross-entropy per image (lower is better; the CNN's labels are used for the metric only, never by recovery).

    python benchmarks/recovery.py [--models autoencoder,cnn] [--sparsities 0.8,0.9,0.95] [--variants all|0,2]
        [--methods fls] [--recover-steps 8] [--override recover_lr=3e-4 ...] [--tag NAME] [--structured]

``--structured`` (methods magnitude, sparsegpt): the same variants with ``--structure channels`` on the CNN
and ``neurons`` on the autoencoder (whole channels / hidden units removed and the tensors shrunk; the
fine-tuning trains the smaller graph), rows labelled ``METHOD channels`` / ``METHOD neurons``.

Results: ``benchmarks/results/recovery.{json,md}`` (rows of other runs are kept, keyed by model, method,
variant, sparsity and tag).
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

from fls_compress import RunOptions, compress  # noqa: E402
from fls_compress.configs import config_types  # noqa: E402
from benchmarks.fls_ablation import _metric  # noqa: E402  (the same quality metric as the ablation)
from fls_compress.progress import attach_cli_logging  # noqa: E402
from sample_models.build_samples import N_CALIB, N_TEST, SPLIT_SEED  # noqa: E402
from sample_models.datasets import load_mnist5k, split_train_test  # noqa: E402

N_VAL = 1000
VARIANTS = ["one-shot", "gradual, no fine-tuning", "gradual + distillation (calibration inputs)",
            "gradual + distillation (+ 1976 unlabelled train images)"]
DATA = ["calibration", "calibration", "calibration", "calibration + pool"]
STEM = {"autoencoder": "mnist_autoencoder", "cnn": "mnist_cnn"}
# The FLS paper (McGowan et al. 2024) reports gradual pruning on its own MNIST autoencoder / ResNet setups,
# with different architectures, training and data: no row here matches its setting, so none is quoted.


def _train_images() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_mnist5k()
    x_train, y_train, _, _ = split_train_test(x, y, N_TEST, seed=SPLIT_SEED)
    return x_train.astype(np.float32), y_train


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def run(model_key: str, method: str, samples: Path, sparsities: list[float], variants: list[int], recover_steps: int,
        overrides: dict, tag: str, seed: int, threads: int, tmp: Path, structured: bool = False) -> list[dict]:
    stem = STEM[model_key]
    structure = ("channels" if model_key == "cnn" else "neurons") if structured else None
    label = f"{method} {structure}" if structure else method
    x_train, y_train = _train_images()
    x_val, y_val = x_train[N_CALIB:N_CALIB + N_VAL], y_train[N_CALIB:N_CALIB + N_VAL]
    pool = tmp / f"{model_key}_pool.npz"
    shape = (-1, 784) if model_key == "autoencoder" else (-1, 1, 28, 28)
    np.savez(pool, input=x_train[N_CALIB + N_VAL:].reshape(shape))  # unlabelled: no labels key
    test = np.load(samples / f"{stem}_test.npz")
    x_test = test["input"].reshape(len(test["input"]), -1)
    y_test = test["labels"] if "labels" in test.files else np.zeros(len(x_test), np.int64)
    dense = {"validation": _metric(model_key, samples / f"{stem}.onnx", x_val, y_val),
             "test": _metric(model_key, samples / f"{stem}.onnx", x_test, y_test)}
    cls = config_types("prune")[method]
    rows = []
    for v in variants:
        for s in sparsities:
            knobs: dict = {"sparsity": s, **({"structure": structure} if structure else {})}
            if v >= 1:
                knobs["recover_steps"] = recover_steps
            if v == 1:
                knobs.update(recover_final_iters=0, **({"recover_iters": 0} if recover_steps > 1 else {}))
            if v >= 2:
                knobs.update(overrides)
            if v == 3:
                knobs["recover_data"] = str(pool)
            config = cls(**knobs)
            out = tmp / "pruned.onnx"
            t0 = time.perf_counter()
            rep = compress(samples / f"{stem}.onnx", config, samples / f"{stem}_calib.npz", output=out,
                           options=RunOptions(seed=seed, threads=threads, progress=False))
            seconds = time.perf_counter() - t0
            rec = rep.get("recovery")
            row = {"model": model_key, "method": label, "variant": VARIANTS[v], "data": DATA[v], "sparsity": s,
                   "tag": tag, "config": {k: val for k, val in config.to_dict().items() if val not in (None, [])},
                   "validation_loss": _metric(model_key, out, x_val, y_val),
                   "test_loss": _metric(model_key, out, x_test, y_test), "dense": dense, "seconds": seconds,
                   "threads": threads, "achieved": rep["sparsity"]["achieved"]}
            if rec is not None:
                row["recovery"] = {"schedule": rec["schedule"], "inputs": rec["inputs"], "seconds": rec["seconds"],
                                   "stopped_early": rec["stopped_early"],
                                   "steps": [{k: st[k] for k in ("achieved", "heldout_before", "heldout_after", "iters_run",
                                                                  "best_iter", "stopped_early")} for st in rec["steps"]]}
            rows.append(row)
            print(f"{model_key:11s} {label:5s} {s:.2f} {VARIANTS[v]:50s} {tag:10s} val {row['validation_loss']:.4f} "
                  f"test {row['test_loss']:.4f} ({seconds:.0f}s)", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["Validation / test loss after pruning (lower is better; onnxruntime on the written model) and the wall time "
             "of the whole `compress` run (1 thread; 2 cores shared with other jobs, so times are inflated). "
             "Autoencoder: Bernoulli NLL per image; CNN: cross-entropy per image. Validation = training images "
             "1024..2023 (not calibration; recipe defaults chosen here), test = the 1000 test images. `data`: what the "
             "pruning and the distillation read: `calibration` = the 819 calibration images left after compress's "
             "20% verification hold-out (unlabelled for recovery); `+ pool` adds `--recover-data` with 1976 unlabelled "
             "training images 2024..3999 (never validation or test images). "
             "Seed 0, one run per cell. Times were measured while up to ~14 processes shared the 2 cores (load average "
             "8-14), so they are inflated up to ~10x and not comparable between rows (the FLS one-shot job at 90% on the "
             "autoencoder takes ~48 s unloaded, `fls_prune_time.md`). Rows tagged `lr...`: the validation search of "
             "`--recover-lr` (the 90% autoencoder row of the default recipe is the `lr1e-3` run, whose settings are the "
             "default); one-shot and `gradual, no fine-tuning` do not depend on the learning rate. Structured rows "
             "(`--structured`; `sparsegpt channels` / `sparsegpt neurons`: structured OBS removing whole CNN channels / "
             "autoencoder hidden units, the tensors shrunk): the gradual rows prune in 4 steps, tag `1 step` is one "
             "prune then one distillation phase (`--recover-steps 1`).", ""]
    for model, kind in dict.fromkeys((r["model"], " " in r["method"]) for r in rows):
        mrows = [r for r in rows if r["model"] == model and (" " in r["method"]) == kind]
        dense = mrows[0]["dense"]
        sparsities = sorted({r["sparsity"] for r in mrows})
        what = "structured (fraction of channels / neurons removed)" if kind else "unstructured (fraction of weights)"
        lines += [f"### {model}, {what} (dense: validation {dense['validation']:.3f}, test {dense['test']:.3f})", "",
                  "| method | variant | data | tag | " + " | ".join(f"{int(round(s * 100))}% val / test (s)" for s in sparsities) + " |",
                  "|---|---|---|---|" + "---|" * len(sparsities)]
        keys = list(dict.fromkeys((r["method"], r["variant"], r["data"], r["tag"]) for r in mrows))
        for key in keys:
            cells = []
            for s in sparsities:
                r = next((r for r in mrows if (r["method"], r["variant"], r["data"], r["tag"]) == key and r["sparsity"] == s), None)
                cells.append("-" if r is None else f"{r['validation_loss']:.3f} / {r['test_loss']:.3f} ({r['seconds']:.0f})")
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] or 'default'} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, default=ROOT / "sample_models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", default="autoencoder,cnn")
    ap.add_argument("--methods", default="fls", help="comma-separated curvature methods (fls, obert, ief, mfac)")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--variants", default="all", help="all, or comma-separated 0-based indices into: " + "; ".join(VARIANTS))
    ap.add_argument("--recover-steps", type=int, default=8, help="T of the gradual rows")
    ap.add_argument("--override", nargs="*", default=[], help="config knobs KEY=VALUE of the fine-tuned rows (tuning)")
    ap.add_argument("--tag", default="", help="label of this row set (tuning runs); empty = the default recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--structured", action="store_true", help="--structure channels (CNN) / neurons (autoencoder)")
    args = ap.parse_args(argv)
    attach_cli_logging(quiet=True)
    variants = list(range(len(VARIANTS))) if args.variants == "all" else [int(i) for i in args.variants.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    overrides = _parse_overrides(args.override)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for method in args.methods.split(","):
                for s in sparsities:  # saved after each sparsity, so an interrupted sweep keeps what it measured
                    rows = run(model, method, args.samples, [s], variants, args.recover_steps, overrides, args.tag,
                               args.seed, args.threads, Path(tmp), args.structured)
                    merged = save(rows, args.out)
    print(markdown(merged))
    return 0


def save(rows: list[dict], out: Path) -> list[dict]:
    """Merge ``rows`` into ``out/recovery.json`` (same model, method, variant, sparsity and tag: replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recovery.json"
    key = lambda r: (r["model"], r["method"], r["variant"], r["sparsity"], r["tag"])  # noqa: E731
    if path.exists():
        redone = {key(r) for r in rows}
        rows = [r for r in json.loads(path.read_text()) if key(r) not in redone] + rows
    rows.sort(key=lambda r: (r["model"], r["method"], r["tag"] != "", r["tag"], VARIANTS.index(r["variant"]), r["sparsity"]))
    path.write_text(json.dumps(rows, indent=2) + "\n")
    (out / "recovery.md").write_text(markdown(rows))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
