"""Compressed models that run faster? Quality, size, onnxruntime latency and time to make, side by side.

    python benchmarks/latency.py --out benchmarks/results [--models cnn,autoencoder,wide_mlp,minilm,byte_classifier,ocr_det]

Models: the sample MNIST CNN and autoencoder (``make samples``), a wide MLP 1024-4096-4096-1024 (ReLU,
torch's default init, exported by torch; Gaussian inputs) and the pretrained all-MiniLM-L6-v2 encoder on
real text (``make bench-weights``; built and exported exactly as in ``benchmarks/transformer_encoder.py``,
sequences of 32 tokens), and the byte-sequence classifier of ``benchmarks/quantize_cost.py`` (a look-alike
of a user's tf2onnx export: int32 bytes [N, 2048], Embedding, three Conv2D with channel-last Transposes,
GlobalMaxPool, two Dense layers, Softmax over 214 classes), and the trained PP-OCRv4 text detector
(paddle2onnx, ``make bench-weights``) on synthetic text images. Rows (:data:`ROW_BUILDERS`, one function each; append a builder to add a row,
e.g. structured pruning):

* ``dense``: the model itself;
* ``ours int8 W8A8``: ``quantize --bits 8 --activations int8 -m gptq`` (per-channel int8 weights, uint8
  static activations, the integer-kernel QDQ placement);
* ``ours int8 W8A8 (entropy ranges)`` / ``(mse ranges)``: the same with ``--act-calibration entropy`` / ``mse``;
* ``ours int8 W8A8 dynamic``: ``quantize --bits 8 --activations int8-dynamic -m gptq`` (MatMul/Gemm inputs
  quantized per call: onnxruntime's DynamicQuantizeMatMul; Conv inputs static);
* ``ours int4 MatMulNBits``: ``quantize --bits 4 --granularity block:32 -m gptq`` (MatMul and Gemm weights as
  ``com.microsoft.MatMulNBits``, a shorter last block where 32 does not divide K; float activations, i.e.
  accuracy_level 0; Conv weights stay int4 DequantizeLinear at opset 21);
* ``ours int4 MatMulNBits + int8 activations``: the same with ``--activations int8`` (MatMulNBits
  ``accuracy_level`` 4: its input quantized to int8 per block at run time, int8 dot products);
* ``ort quantize_static``: onnxruntime's static quantizer, QDQ, per-channel, U8S8, MinMax, same calibration;
* ``ort quantize_dynamic``: onnxruntime's dynamic quantizer (int8 weights, per tensor);
* ``2:4 sparsegpt``: ``prune --pattern 2:4 -m sparsegpt`` (dense kernels on onnxruntime CPU);
* ``structured 30% / 50%``: ``prune --structure channels`` (``neurons`` on models without Conv) with
  ``-m sparsegpt`` (structured OBS) and, at 50%, ``-m magnitude`` (L2 norms, no compensation): smaller tensors;
  ``+ distillation``: the 50% OBS prune then ``--recover-steps 1`` (the smaller graph fine-tuned for 400 Adam
  steps on KL(dense || pruned) over the calibration inputs, early-stopped on a held-out 10% of them; Adam
  lr 1e-3, MiniLM 2e-5 as chosen on that held-out split);
* ``structured heads 30% / 50%``: ``prune --structure heads`` (models with attention only: MiniLM) with
  ``-m sparsegpt`` (structured OBS on Wo) and ``-m magnitude`` (L2 norm of each head's weights).

Every artifact is timed in ONE process with the same session options (CPU provider, 1 intra-op thread so
that the other processes sharing this machine's two cores disturb the timings least, full graph
optimisation), after warm-up, alternating the artifacts run by run; median of ``--runs`` runs at batch 1
and batch 64, reported as dense median / artifact median (above 1: faster). Quality against the dense
model on held-out inputs: top-1 agreement (classifiers; the MLP's argmax over its 1024 outputs, on 4096
held-out rows: every int8 variant flips it on 2-3% of rows, so with 256 rows, where one row is 0.4%, the
binomial standard error of ~1% would rank the rows by chance), mean
per-sample output cosine, Bernoulli NLL (autoencoder), sentence-embedding cosine (MiniLM), text-map IoU at
probability 0.3 (PP-OCRv4 det). Time to make:
wall seconds to produce the file (our rows: ``compress()`` minus its verification). Kernels: the integer
kernels in onnxruntime's optimised graph (:func:`fls_compress.latency.kernel_census`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MLP_DIMS = (1024, 4096, 4096, 1024)
MLP_EVAL_ROWS = 4096  # held-out rows: argmax agreement over near-tied outputs needs many (see the module docstring)
BATCHES = (1, 64)


@dataclass
class Bench:
    """One model under test: its file, calibration and held-out inputs (npz keyed by input name)."""

    name: str
    model: Path
    calib: Path
    eval: Path
    workdir: Path
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- models
def prepare_cnn(work: Path, seed: int) -> Bench:
    s = ROOT / "sample_models"
    return Bench("cnn", s / "mnist_cnn.onnx", s / "mnist_cnn_calib.npz", s / "mnist_cnn_test.npz", work)


def prepare_autoencoder(work: Path, seed: int) -> Bench:
    s = ROOT / "sample_models"
    return Bench("autoencoder", s / "mnist_autoencoder.onnx", s / "mnist_autoencoder_calib.npz",
                 s / "mnist_autoencoder_test.npz", work, {"bernoulli": True})


def prepare_wide_mlp(work: Path, seed: int) -> Bench:
    import torch

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(MLP_DIMS[:-1], MLP_DIMS[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(MLP_DIMS) - 2 else [])
    net = torch.nn.Sequential(*layers).eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((512 + MLP_EVAL_ROWS, MLP_DIMS[0])).astype(np.float32)
    np.savez(work / "mlp_calib.npz", input=x[:512])
    np.savez(work / "mlp_eval.npz", input=x[512:])
    torch.onnx.export(net, (torch.as_tensor(x[:2]),), work / "wide_mlp.onnx", input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    return Bench("wide_mlp", work / "wide_mlp.onnx", work / "mlp_calib.npz", work / "mlp_eval.npz", work, {"argmax": True})


def prepare_minilm(work: Path, seed: int) -> Bench:
    from benchmarks import transformer_encoder as te

    sub = work / "minilm"
    sub.mkdir(exist_ok=True)
    te.prepare(sub, "minilm", seed)
    # recover_lr: Adam at the default 1e-3 moves pretrained transformer weights (RMS ~0.04) too far; on the
    # recovery's own held-out 10% of the calibration sentences 1e-4 never lowered the loss and 2e-5 did
    # (75.67 -> 74.47), so the distillation row uses 2e-5 (never chosen on the eval sentences)
    return Bench("minilm", sub / "encoder.onnx", sub / "calib.npz", sub / "eval.npz", sub,
                 {"sentence": True, "recover_lr": 2e-5})


def prepare_byte_classifier(work: Path, seed: int) -> Bench:
    """The look-alike of a user's tf2onnx byte-sequence classifier (``benchmarks/quantize_cost.py``)."""
    from benchmarks.quantize_cost import build_byte_classifier

    model, calib, held_out = build_byte_classifier(work, seed)
    return Bench("byte_classifier", model, calib, held_out, work, {"argmax": True})


def prepare_ocr_det(work: Path, seed: int) -> Bench:
    """The trained PP-OCRv4 text detector (paddle2onnx export, weights as Constant nodes; ``make
    bench-weights``) on synthetic 256x256 text images, 32 for calibration and 64 held out
    (:func:`benchmarks.gptq_rows.prepare_ocr`'s generator). Quality adds the IoU of the binary text maps
    (probability > 0.3, PP-OCR's threshold) with the dense model's."""
    import matplotlib.cbook
    from PIL import Image

    from benchmarks.gptq_rows import OCR_MODEL, TARGET, _ocr_image

    model = TARGET / OCR_MODEL
    photo = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    rng = np.random.default_rng(seed)
    x = np.stack([_ocr_image(rng, photo, 256) for _ in range(96)])
    np.savez(work / "ocr_calib.npz", x=x[:32])
    np.savez(work / "ocr_eval.npz", x=x[32:])
    return Bench("ocr_det", model, work / "ocr_calib.npz", work / "ocr_eval.npz", work, {"text_map": 0.3})


MODELS: dict[str, Callable[[Path, int], Bench]] = {
    "cnn": prepare_cnn, "autoencoder": prepare_autoencoder, "wide_mlp": prepare_wide_mlp, "minilm": prepare_minilm,
    "byte_classifier": prepare_byte_classifier, "ocr_det": prepare_ocr_det,
}


# ----------------------------------------------------------------------------- rows
def _ours(bench: Bench, out: Path, config, seed: int) -> dict:
    from fls_compress import RunOptions, compress

    rep = compress(bench.model, config, bench.calib, output=out, eval_data=bench.eval,
                   options=RunOptions(seed=seed, progress=False, latency=False))
    t = rep["timing_s"]
    info = rep.get("method_info", {})
    notes = {k: info[k] for k in ("matmul_nbits_weights", "int32_biases", "activation_qdq_tensors", "opset") if info.get(k)}
    return {"make_s": t["total"] - t.get("verify", 0.0) - t.get("latency", 0.0), "notes": notes}


def row_dense(bench: Bench, out: Path, seed: int) -> dict:
    out.write_bytes(bench.model.read_bytes())
    return {"make_s": 0.0}


def row_w8a8(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=8, activations="int8"), seed)


def row_w8a8_entropy(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=8, activations="int8", act_calibration="entropy"), seed)


def row_w8a8_mse(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=8, activations="int8", act_calibration="mse"), seed)


def row_w8a8_dynamic(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=8, activations="int8-dynamic"), seed)


def row_int4_nbits(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=4, granularity="block:32"), seed)


def row_int4_nbits_int8(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import GPTQConfig

    return _ours(bench, out, GPTQConfig(bits=4, granularity="block:32", activations="int8"), seed)


def row_24(bench: Bench, out: Path, seed: int) -> dict:
    from fls_compress import SparseGPTConfig

    return _ours(bench, out, SparseGPTConfig(pattern="2:4"), seed)


def _structure(bench: Bench) -> str:
    """``channels`` for models with convolutions, else ``neurons`` (Gemm/MatMul hidden units)."""
    import onnx

    graph = onnx.load(str(bench.model), load_external_data=False).graph
    return "channels" if any(n.op_type == "Conv" for n in graph.node) else "neurons"


def _structured(fraction: float, method: str, recover: bool = False):
    def build(bench: Bench, out: Path, seed: int) -> dict:
        from fls_compress import MagnitudeConfig, SparseGPTConfig

        cls = SparseGPTConfig if method == "sparsegpt" else MagnitudeConfig
        extra = {"recover_steps": 1, "recover_lr": bench.extra.get("recover_lr")} if recover else {}
        return _ours(bench, out, cls(sparsity=fraction, structure=_structure(bench), **extra), seed)

    return build


class NotApplicable(Exception):
    """A row that does not exist for this model (e.g. attention heads on a CNN): left out of its table."""


def _heads(fraction: float, method: str):
    """``prune --structure heads`` rows, for models with attention (a Softmax) only."""
    def build(bench: Bench, out: Path, seed: int) -> dict:
        import onnx

        from fls_compress import MagnitudeConfig, SparseGPTConfig

        graph = onnx.load(str(bench.model), load_external_data=False).graph
        outputs = {o.name for o in graph.output}
        if not any(n.op_type == "Softmax" and n.output[0] not in outputs for n in graph.node):
            raise NotApplicable("no attention")  # a classifier's output Softmax is not attention
        cls = SparseGPTConfig if method == "sparsegpt" else MagnitudeConfig
        return _ours(bench, out, cls(sparsity=fraction, structure="heads"), seed)

    return build


def _reader(bench: Bench):
    from onnxruntime.quantization import CalibrationDataReader

    data = dict(np.load(bench.calib))
    data.pop("labels", None)
    n = len(next(iter(data.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v[i:i + 32] for k, v in data.items()} for i in range(0, n, 32)])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def row_ort_static(bench: Bench, out: Path, seed: int) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    quantize_static(str(bench.model), str(out), _reader(bench), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"make_s": time.perf_counter() - t0}


def row_ort_dynamic(bench: Bench, out: Path, seed: int) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    quantize_dynamic(str(bench.model), str(out), weight_type=QuantType.QInt8)
    return {"make_s": time.perf_counter() - t0}


#: (row name, builder(bench, output path, seed) -> {"make_s", "notes"}); the extension point for more rows
ROW_BUILDERS: list[tuple[str, Callable[[Bench, Path, int], dict]]] = [
    ("dense", row_dense),
    ("ours int8 W8A8 (gptq)", row_w8a8),
    ("ours int8 W8A8 (gptq, entropy ranges)", row_w8a8_entropy),
    ("ours int8 W8A8 (gptq, mse ranges)", row_w8a8_mse),
    ("ours int8 W8A8 dynamic (gptq)", row_w8a8_dynamic),
    ("ours int4 MatMulNBits (gptq)", row_int4_nbits),
    ("ours int4 MatMulNBits + int8 activations (gptq)", row_int4_nbits_int8),
    ("ort quantize_static (QDQ, per-channel, U8S8)", row_ort_static),
    ("ort quantize_dynamic", row_ort_dynamic),
    ("2:4 sparsegpt", row_24),
    ("structured 30% (sparsegpt OBS)", _structured(0.3, "sparsegpt")),
    ("structured 50% (sparsegpt OBS)", _structured(0.5, "sparsegpt")),
    ("structured 50% (magnitude L2)", _structured(0.5, "magnitude")),
    ("structured 50% (sparsegpt OBS) + distillation", _structured(0.5, "sparsegpt", recover=True)),
    ("structured heads 30% (sparsegpt OBS)", _heads(0.3, "sparsegpt")),
    ("structured heads 30% (magnitude L2)", _heads(0.3, "magnitude")),
    ("structured heads 50% (sparsegpt OBS)", _heads(0.5, "sparsegpt")),
    ("structured heads 50% (magnitude L2)", _heads(0.5, "magnitude")),
]


# ----------------------------------------------------------------------------- measurement
def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _outputs(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    s = _session(path)
    return np.concatenate([s.run(None, {k: v[i:i + 64] for k, v in inputs.items()})[0]
                           for i in range(0, len(next(iter(inputs.values()))), 64)])


def quality(bench: Bench, dense: np.ndarray, path: Path, inputs: dict[str, np.ndarray], labels) -> dict:
    out = _outputs(path, inputs)
    a, b = dense.reshape(len(dense), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    q = {"cosine": float(((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)).mean()),
         "relative_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}
    if dense.ndim == 2 and (labels is not None or bench.extra.get("argmax")) and not bench.extra.get("bernoulli"):
        q["agreement"] = float((dense.argmax(1) == out.argmax(1)).mean())
        if labels is not None:
            q["accuracy"] = float((out.argmax(1) == labels).mean())
    if bench.extra.get("bernoulli"):
        from fls_compress.verification import bernoulli_nll

        q["bernoulli_nll"] = float(bernoulli_nll(out, next(iter(inputs.values()))).mean())
    if bench.extra.get("text_map"):
        mask, got = dense > bench.extra["text_map"], out > bench.extra["text_map"]
        q["text_iou"] = float((mask & got).sum() / max((mask | got).sum(), 1))
    if bench.extra.get("sentence"):
        from benchmarks.transformer_encoder import sentence_cosine

        q["sentence_cosine"] = sentence_cosine(path, bench.workdir)
    return q


def time_all(paths: dict[str, Path], inputs: dict[str, np.ndarray], runs: int) -> dict[str, dict[int, float]]:
    """Median ms per artifact and batch, all artifacts alternating in one process
    (:func:`fls_compress.latency.time_sessions`, 2 warm-up runs)."""
    from fls_compress.latency import time_sessions

    sessions = {k: _session(p) for k, p in paths.items()}
    result: dict[str, dict[int, float]] = {k: {} for k in paths}
    for batch in BATCHES:
        timed = time_sessions(sessions, {k: v[:batch] for k, v in inputs.items()}, runs=runs, warmup=2)
        for k in paths:
            result[k][batch] = timed[k]["median_ms"]
    return result


def run_model(name: str, work: Path, seed: int, runs: int, rows: list[str] | None) -> list[dict]:
    from fls_compress.latency import kernel_census

    bench = MODELS[name](work, seed)
    data = dict(np.load(bench.eval))
    labels = data.pop("labels", None)
    dense = _outputs(bench.model, data)
    built: dict[str, Path] = {}
    out_rows = []
    for row_name, builder in ROW_BUILDERS:
        if rows is not None and row_name.split(" ")[0] not in rows and row_name not in rows:
            continue
        path = work / f"{name}.{len(built)}.onnx"
        t0 = time.perf_counter()
        try:
            made = builder(bench, path, seed)
        except NotApplicable:
            continue
        except Exception as exc:  # noqa: BLE001 - a row that cannot be built is reported, not fatal
            out_rows.append({"model": name, "row": row_name, "status": f"failed: {type(exc).__name__}: {str(exc)[:200]}",
                             "seconds": time.perf_counter() - t0})
            print(f"{name} / {row_name}: failed: {exc}", file=sys.stderr, flush=True)
            continue
        census = kernel_census(path)
        row = {"model": name, "row": row_name, "status": "ok", "size_bytes": path.stat().st_size, **made,
               "integer_kernels": census["integer_kernels"], "float_layer_kernels": census["float_layer_kernels"],
               **quality(bench, dense, path, data, labels)}
        built[row_name] = path
        out_rows.append(row)
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
    timed = time_all(built, data, runs)
    dense_ms = timed.get("dense")
    for row in out_rows:
        if row["status"] != "ok":
            continue
        for b in BATCHES:
            row[f"ms_batch{b}"] = timed[row["row"]][b]
            if dense_ms:
                row[f"speedup_batch{b}"] = dense_ms[b] / timed[row["row"]][b]
    return out_rows


# ----------------------------------------------------------------------------- output
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(result: dict) -> str:
    lines = [
        "# Latency, quality, size and time to make, side by side", "",
        f"onnxruntime {result['onnxruntime']} CPUExecutionProvider, 1 intra-op thread, {result['cpu']}; every artifact of "
        f"a model timed in one process, alternating, median of {result['runs']} runs after warm-up; speed-up = dense "
        "median / artifact median (above 1: faster). Quality against the dense model on held-out inputs. Time to make: "
        "wall seconds (ours: compress() minus its verification). Machine shared with other jobs (2 cores): timings "
        "carry that noise.", "",
    ]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        lines += [f"## {model}", "",
                  "| row | agreement | cosine | NLL / sentence cos / text IoU | size MB | speed-up b1 | speed-up b64 | ms b1 | ms b64 | "
                  "make s | integer kernels (float layers) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["model"] == model):
            if r["status"] != "ok":
                lines.append(f"| {r['row']} | {r['status']} |||||||||")
                continue
            extra = r.get("bernoulli_nll", r.get("sentence_cosine", r.get("text_iou")))
            kern = ", ".join(f"{k} {v}" for k, v in r["integer_kernels"].items()) or "none"
            fl = sum(r["float_layer_kernels"].values())
            lines.append(
                f"| {r['row']} | {_fmt(r.get('agreement'), '.4f')} | {r['cosine']:.5f} | {_fmt(extra, '.4f')} | "
                f"{r['size_bytes'] / 1e6:.2f} | {_fmt(r.get('speedup_batch1'), '.2f')} | {_fmt(r.get('speedup_batch64'), '.2f')} | "
                f"{r['ms_batch1']:.3f} | {r['ms_batch64']:.2f} | {r['make_s']:.1f} | {kern} ({fl}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--rows", default=None, help="only these rows (first word of the row name, e.g. dense,ours,ort)")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per artifact and batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import platform

    import onnxruntime as ort

    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    if "minilm" in models:
        from benchmarks.minilm_text import MissingWeights, model_dir

        try:
            model_dir()
        except MissingWeights as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if "ocr_det" in models:
        from benchmarks.gptq_rows import OCR_MODEL, TARGET

        if not (TARGET / OCR_MODEL).exists():
            print(f"error: {TARGET / OCR_MODEL} missing; run: make bench-weights", file=sys.stderr)
            return 2
    rows_filter = args.rows.split(",") if args.rows else None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fls-latency-bench-") as tmp:
        for name in models:
            work = Path(tmp) / name
            work.mkdir()
            rows += run_model(name, work, args.seed, args.runs, rows_filter)
    result = {"onnxruntime": ort.__version__, "cpu": platform.processor() or platform.machine(), "runs": args.runs,
              "threads": 1, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latency.json"
    if path.exists() and (rows_filter or set(models) != set(MODELS)):  # a partial run keeps the other rows
        old = json.loads(path.read_text()).get("rows", [])
        redone = {(r["model"], r["row"]) for r in rows}
        rows = [r for r in old if (r["model"], r["row"]) not in redone] + rows
        order = {m: i for i, m in enumerate(MODELS)}
        names = [n for n, _ in ROW_BUILDERS]
        rows.sort(key=lambda r: (order.get(r["model"], 99), names.index(r["row"]) if r["row"] in names else 99))
        result["rows"] = rows
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = render(result)
    (args.out / "latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
