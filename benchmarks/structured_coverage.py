"""Which real architectures can ``prune --structure channels`` shrink? Group coverage on exported models.

    python benchmarks/structured_coverage.py --out benchmarks/results

For each model: the structural groups :func:`fls_compress.structured.groups.find_groups` finds (coupled
producers included), the share of the prunable Conv/Gemm/MatMul weights whose output channels belong to a
removable group, the groups left whole by reason, and one ``prune --structure channels -m magnitude
--sparsity 0.3`` run through :func:`fls_compress.compress` (onnxruntime verification included): parameters
and file size before and after. Quality is not the point here (several models have random weights; see
``latency.md`` and ``structured.md`` for quality and speed).

Models: torchvision ResNet-18, MobileNetV2, MobileNetV3-small and EfficientNet-B0 (random weights with
BatchNorm statistics and Conv biases drawn as a trained network's would be: equal tensors, such as
torchvision's all-zero initial biases, would otherwise be shared by the exporter; torch legacy exporter, 3x64x64), a
YOLOv8-style detector (``sample_models/c2f_net.py``: C2f blocks, SPPF, an FPN step; exported three ways), the sample MNIST CNN (``make samples``), the
byte-classifier look-alike of ``quantize_cost.py`` (channel-last Conv2D stack), and PaddleOCR's trained
PP-OCRv4 detector and recogniser and the v2.0 direction classifier (paddle2onnx, weights in Constant
nodes; ``make bench-weights``; left out when missing).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPARSITY = 0.3


def _torchvision(name: str):
    def build(work: Path) -> tuple[Path, Path]:
        import torch
        import torchvision

        torch.manual_seed(0)
        net = getattr(torchvision.models, name)().eval()
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.data.uniform_(-0.5, 0.5)
        for conv in (m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None):
            conv.bias.data.uniform_(-0.1, 0.1)  # torchvision starts them at zero: the exporter would share them
        x = np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32)
        path = work / f"{name}.onnx"
        torch.onnx.export(net, (torch.as_tensor(x[:2]),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
        np.savez(work / f"{name}.npz", x=x)
        return path, work / f"{name}.npz"

    return build


def _sample_cnn(work: Path) -> tuple[Path, Path]:
    s = ROOT / "sample_models"
    return s / "mnist_cnn.onnx", s / "mnist_cnn_calib.npz"


def _byte_classifier(work: Path) -> tuple[Path, Path]:
    from benchmarks.quantize_cost import build_byte_classifier

    model, calib, _ = build_byte_classifier(work, 0)
    return model, calib


def _yolo_style(dynamo: bool, chunk: bool):
    """The YOLOv8-style detector of ``sample_models/c2f_net.py`` (C2f, SPPF, FPN upsample + concat), 3x64x64."""
    def build(work: Path) -> tuple[Path, Path]:
        from sample_models.c2f_net import YoloStyle, export, randomize_batchnorm

        path = export(randomize_batchnorm(YoloStyle(chunk)), work / "yolo_style.onnx", 64, dynamo, outputs=2)
        np.savez(work / "yolo_style.npz", x=np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32))
        return path, work / "yolo_style.npz"

    return build


def _paddle(file: str, shape: tuple[int, ...]):
    def build(work: Path) -> tuple[Path, Path] | None:
        from benchmarks.gptq_rows import TARGET

        path = TARGET / "rapidocr_onnxruntime" / "models" / file
        if not path.exists():
            return None
        np.savez(work / f"{file}.npz", x=np.random.default_rng(0).normal(size=(8, *shape)).astype(np.float32))
        return path, work / f"{file}.npz"

    return build


MODELS = {
    "resnet18 (torchvision)": _torchvision("resnet18"),
    "mobilenet_v2 (torchvision)": _torchvision("mobilenet_v2"),
    "mobilenet_v3_small (torchvision)": _torchvision("mobilenet_v3_small"),
    "efficientnet_b0 (torchvision)": _torchvision("efficientnet_b0"),
    "YOLOv8-style C2f chunk (torch legacy: Shape/Slice)": _yolo_style(dynamo=False, chunk=True),
    "YOLOv8-style C2f split (torch legacy: Split)": _yolo_style(dynamo=False, chunk=False),
    "YOLOv8-style C2f chunk (torch dynamo: Split num_outputs)": _yolo_style(dynamo=True, chunk=True),
    "sample MNIST CNN": _sample_cnn,
    "byte classifier (tf2onnx-style)": _byte_classifier,
    "PP-OCRv4 det (paddle2onnx)": _paddle("ch_PP-OCRv4_det_infer.onnx", (3, 256, 256)),
    "PP-OCRv4 rec (paddle2onnx)": _paddle("ch_PP-OCRv4_rec_infer.onnx", (3, 48, 320)),
    "PP-OCR v2.0 cls (paddle2onnx)": _paddle("ch_ppocr_mobile_v2.0_cls_infer.onnx", (3, 48, 192)),
}


def _reason(text: str) -> str:
    """A skip reason with names and node labels taken out, so that equal causes count together."""
    text = re.sub(r"'[^']*'", "X", text)
    text = re.sub(r"\b(node|Conv|group of) [^\s,()]*[^\s,():]", r"\1 X", text)
    return text[:110]


def coverage(path: Path, calib: Path) -> dict:
    import onnx

    from fls_compress import MagnitudeConfig, RunOptions, compress
    from fls_compress.io.onnx_model import prunable_initializers
    from fls_compress.structured.groups import find_groups
    from fls_compress.structured.rewrite import explicit_splits, promote_constants

    model = onnx.load(str(path))
    promote_constants(model)
    explicit_splits(model)  # as the structured stage does first (Split num_outputs -> constant sizes)
    sites = {s.name: int(np.prod(s.shape)) for s in prunable_initializers(model) if s.op_type == "Conv"}
    analysis = find_groups(model, "channels")
    covered = {w for g in analysis.groups for w in (g.producer, *g.coupled)}
    covered |= {s.name for g in analysis.groups for s in g.slices if s.role == "depthwise weight"}
    row = {
        "conv_layers": len(sites), "groups": len(analysis.groups),
        "coupled_producers": sum(len(g.coupled) for g in analysis.groups),
        "layers_in_groups": len(covered & set(sites)),
        "weights_in_groups": sum(sites[w] for w in covered if w in sites) / max(sum(sites.values()), 1),
        "skipped": dict(Counter(_reason(s.reason) for s in analysis.skipped
                                if s.producer not in covered).most_common()),
    }
    try:
        rep = compress(path, MagnitudeConfig(sparsity=SPARSITY, structure="channels"), calib,
                       options=RunOptions(seed=0, progress=False, latency=False))
        s = rep["structure"]
        row.update(status="ok", parameters_ratio=s["parameters"]["ratio"], size_ratio=s["size_bytes"]["ratio"],
                   verified=bool(rep.get("verification")))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        row.update(status=f"{type(exc).__name__}: {str(exc)[:160]}")
    return row


def render(rows: dict[str, dict]) -> str:
    lines = [
        "# Structured pruning coverage on exported models (`--structure channels`)", "",
        "Conv layers whose output channels are in a removable group (as producer, coupled producer or depthwise "
        "pass-through; a Conv whose output is split on the channels counts when one of its parts is a group, the "
        "parts left whole are listed with their reason), their share of the Conv weights, and one `-m magnitude --sparsity {SPARSITY}` run "
        "(onnxruntime-verified): parameters and file size after / before. Generated by "
        "`benchmarks/structured_coverage.py`.", "",
        "| model | Conv layers | in groups | share of Conv weights | groups | coupled producers | params after | size after | left whole (count: reason) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r.get("status") == "missing":
            lines.append(f"| {name} | not installed (make bench-weights) ||||||||")
            continue
        after = (f"{r['parameters_ratio']:.2f}x", f"{r['size_ratio']:.2f}x") if r.get("status") == "ok" else (r.get("status"), "")
        skipped = "; ".join(f"{n}: {k}" for k, n in r["skipped"].items()) or "-"
        lines.append(f"| {name} | {r['conv_layers']} | {r['layers_in_groups']} | {r['weights_in_groups']:.2f} | "
                     f"{r['groups']} | {r['coupled_producers']} | {after[0]} | {after[1]} | {skipped} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the model names")
    args = ap.parse_args(argv)
    chosen = [m for m in MODELS if m in args.models.split(",")] if args.models != ",".join(MODELS) else list(MODELS)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fls-coverage-") as tmp:
        for name in chosen:
            work = Path(tmp) / str(len(rows))
            work.mkdir()
            built = MODELS[name](work)
            rows[name] = {"status": "missing"} if built is None else coverage(*built)
            print(name, json.dumps(rows[name], default=str), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured_coverage.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    md = render(rows)
    (args.out / "structured_coverage.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
