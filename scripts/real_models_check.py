#!/usr/bin/env python
"""Compress real pretrained ONNX models shipped inside PyPI wheels and tabulate what happens.

The wheels are fetched and unpacked by the user (this script downloads nothing)::

    pip download --no-deps -d wheels rapidocr-onnxruntime==1.4.4 nudenet==3.4.2 silero-vad==6.2.3 ddddocr==1.6.1
    for w in wheels/*.whl; do unzip -o -q "$w" '*.onnx' -d wheels/x; done
    PYTHONPATH=. python scripts/real_models_check.py --root wheels/x --method fls --out docs/real_models.md

Each model is pruned to 50% on a few synthetic samples (``--shape`` / ``--const`` values below), so
the cosine column is a smoke test of the whole path (conversion, curvature, write-back,
onnxruntime verification), not a quality figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fls_compress import RunOptions, compress, config_from_dict  # noqa: E402
from fls_compress.errors import FlsError  # noqa: E402

#: small settings per method, so every model is a smoke test of the whole path in seconds
FAST = {
    "fls": {"fit_steps": 2, "refit_steps": 1, "batch_size": 2, "moment_samples": 4, "steps": 1},
    "obert": {"num_grads": 4, "steps": 1}, "ief": {"num_grads": 4, "steps": 1}, "mfac": {"num_grads": 4, "steps": 1},
}

#: name -> (path under --root, shapes, consts)
CASES: dict[str, tuple[str, dict[str, tuple[int, ...]], dict[str, float]]] = {
    "PP-OCR v2 cls (paddle2onnx, Constant weights)": ("rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)}, {}),
    "PP-OCRv4 det (paddle2onnx)": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 96, 96)}, {}),
    "PP-OCRv4 rec (paddle2onnx, computed Reshape before BN)": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 160)}, {}),
    "YOLOv8n (Ultralytics, nudenet 320n)": ("nudenet/320n.onnx", {"images": (1, 3, 160, 160)}, {}),
    "Silero VAD 16k op15 (If, LSTM, rank-0 sr, state)": ("silero_vad/data/silero_vad_16k_op15.onnx", {"input": (1, 512)}, {"sr": 16000}),
    "Silero VAD (weights inside If branches)": ("silero_vad/data/silero_vad.onnx", {"input": (1, 512)}, {"sr": 16000}),
    "Silero VAD 16k sequence (LSTM)": ("silero_vad/data/silero_vad_16k_sequence.onnx", {}, {}),
    "ddddocr det (YOLOX-style)": ("ddddocr/common_det.onnx", {}, {}),
    "ddddocr OCR (CNN + LSTM)": ("ddddocr/common.onnx", {"input1": (1, 1, 64, 64)}, {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--method", default="fls")
    parser.add_argument("--out", type=Path, default=None, help="markdown file; rows are appended if it exists")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the model names to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows = ["| model | method | status | sparsity | outputs: cosine (box agreement) | conversion notes |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (rel, shapes, consts) in CASES.items():
            if args.only and not any(key.lower() in name.lower() for key in args.only):
                continue
            path = args.root / rel
            if not path.exists():
                rows.append(f"| {name} | {args.method} | not found ({rel}) | | | |")
                continue
            start = time.perf_counter()
            config = config_from_dict({"method": args.method, "sparsity": 0.5, **FAST.get(args.method, {})})
            options = RunOptions(num_calibration=4, progress=False,
                                 shape=tuple(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()),
                                 const=tuple(f"{k}={v}" for k, v in consts.items()))
            try:
                report = compress(path, config, output=Path(tmp) / "out.onnx", options=options)
            except FlsError as exc:
                rows.append(f"| {name} | {args.method} | fails: {type(exc).__name__}: {exc} | | | |")
                print(rows[-1], flush=True)
                continue
            except Exception as exc:  # noqa: BLE001 - a crash is a bug to report, not to hide
                first = str(exc).splitlines()[0] if str(exc) else ""
                rows.append(f"| {name} | {args.method} | CRASH (bug): {type(exc).__name__}: {first} | | | |")
                print(rows[-1], flush=True)
                continue
            outs = ", ".join(
                f"{k}: {v['cosine_similarity']:.3f}" + (f" ({v['topk_box_agreement']:.2f})" if "topk_box_agreement" in v else "")
                for k, v in report["verification"]["outputs"].items()
            )
            conv = {k: v for k, v in (report.get("conversion") or {}).items() if v and k != "compute_dtype"}
            if "folded_ifs" in conv:
                conv["folded_ifs"] = [f"{f['node']}->{f['branch']}" for f in conv["folded_ifs"]]
            rows.append(
                f"| {name} | {args.method} | ok, {time.perf_counter() - start:.0f}s | {report['sparsity']['achieved']:.2f} "
                f"({len(report['sparsity']['per_layer'])} tensors) | {outs} | {json.dumps(conv, default=str)} |"
            )
            print(rows[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.exists():
            args.out.write_text(args.out.read_text() + "\n".join(rows[2:]) + "\n")
        else:
            header = [
                "# Real pretrained models",
                "",
                "Produced by `scripts/real_models_check.py` (see its docstring for the wheels). Each model is pruned",
                "to 50% on 4 synthetic samples (`--shape`/`--const` as in the script), so the cosine column is a",
                "smoke test of the whole path, not a quality figure; a cosine of 1.000 on a `[B, 1]` output only",
                "says the sign agrees. Conversion notes are the `conversion` field of the report.",
                "",
            ]
            args.out.write_text("\n".join(header + rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
