"""How long does W8A8 quantization take, next to onnxruntime's ``quantize_static``? Wall and CPU per stage.

    python benchmarks/quantize_cost.py --out benchmarks/results [--models byte_classifier,wide_mlp]

Models:

* ``byte_classifier``: a look-alike of a user's 3.2 MB tf2onnx byte-sequence classifier (int32 input
  [N, 2048], 214 classes; embedding + conv1d + pooling + dense), built with torch (random init) in the
  form tf2onnx writes Keras layers: Gather embedding on channel-last [N, L, E]; each Conv1D as
  Unsqueeze -> Transpose -> Conv (kernel 1 x k) -> Relu -> MaxPool (1 x 4) -> Transpose -> Squeeze;
  GlobalMaxPooling1D as ReduceMax; Dense as MatMul + Add; Softmax. 0.79 M weights (3.15 MB).
  Calibration: 512 synthetic "files" (bytes from a per-file Zipf-like distribution, zero-padded after a
  random length), 128 held out.
* ``wide_mlp``: the 1024-4096-4096-1024 ReLU MLP of ``benchmarks/latency.py`` (512 Gaussian inputs).

Rows, all on the same calibration samples, each in a fresh process (imports excluded from the timed
part; the CLI row includes them):

* ``ort quantize_static``: QDQ, per-channel, U8S8, MinMax (batches of 32). It neither verifies nor
  measures latency, so the comparable number of ours is compress() minus verification and latency
  (load + quantize + write), reported as ``comparable s``;
* ``ours rtn W8A8`` / ``ours gptq W8A8``: ``compress()`` with ``--bits 8 --activations int8``; stages from
  the report: load (model, data, checks), capture (onnxruntime passes for layer inputs), hessian (rows and
  X^T X), sweep (inverse Hessian + OBS sweep), act ranges (activation calibration left to do after the
  weights), other quantize (grids, QDQ graph), write, verify, latency; wall and process CPU seconds;
* ``ours gptq-64k W8A8``: the same with ``--max-rows-per-layer 65536`` (the default of 4-bit and pruning runs,
  and of 8-bit ones before; 8-bit now uses 32768, see ``benchmarks/gptq_rows.py``): the one knob that trades
  curvature accuracy for time here;
* ``CLI gptq W8A8``: ``fls-compress quantize ... --bits 8 --activations int8 -m gptq`` as a whole command
  (interpreter start, imports, verification and latency included), wall and CPU of the child process.

``--pythonpath DIR`` runs our rows against another checkout (e.g. an older commit: before/after).
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

CLASSES, LENGTH, EMBED = 214, 2048, 16
CALIB, HELD_OUT = 512, 128


# ----------------------------------------------------------------------------- models
def build_byte_classifier(work: Path, seed: int) -> tuple[Path, Path, Path]:
    import torch

    torch.manual_seed(seed)

    class ByteClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(256, EMBED)
            self.convs = torch.nn.ModuleList([torch.nn.Conv2d(EMBED, 128, (1, 8)), torch.nn.Conv2d(128, 256, (1, 8)),
                                              torch.nn.Conv2d(256, 256, (1, 4))])
            self.w1 = torch.nn.Parameter(torch.randn(256, 512) / 16)
            self.b1 = torch.nn.Parameter(torch.zeros(512))
            self.w2 = torch.nn.Parameter(torch.randn(512, CLASSES) / 512**0.5)
            self.b2 = torch.nn.Parameter(torch.zeros(CLASSES))

        def forward(self, x):
            h = self.embedding(x)  # [N, L, E], channel-last as in Keras
            for conv, pool in zip(self.convs, (4, 4, None)):
                h = h.unsqueeze(1).permute(0, 3, 1, 2)  # ExpandDims + NHWC -> NCHW
                h = torch.relu(conv(h))
                if pool:
                    h = torch.nn.functional.max_pool2d(h, (1, pool))
                h = h.permute(0, 2, 3, 1).squeeze(1)  # NCHW -> NHWC + Squeeze
            h = h.amax(1)  # GlobalMaxPooling1D
            h = torch.relu(h @ self.w1 + self.b1)  # Dense: MatMul + Add
            return torch.softmax(h @ self.w2 + self.b2, -1)

    net = ByteClassifier().eval()
    rng = np.random.default_rng(seed)
    n = CALIB + HELD_OUT
    x = np.zeros((n, LENGTH), dtype=np.int32)
    for i in range(n):  # a file: bytes from its own Zipf-like distribution, zero padding after its length
        p = 1.0 / np.arange(1, 257) ** rng.uniform(0.5, 1.5)
        length = int(rng.integers(256, LENGTH + 1))
        x[i, :length] = rng.permutation(256)[rng.choice(256, size=length, p=p / p.sum())]
    np.savez(work / "byte_calib.npz", input=x[:CALIB])
    np.savez(work / "byte_eval.npz", input=x[CALIB:])
    path = work / "byte_classifier.onnx"
    torch.onnx.export(net, (torch.as_tensor(x[:2]),), path, input_names=["input"], output_names=["probabilities"],
                      dynamic_axes={"input": {0: "n"}, "probabilities": {0: "n"}}, opset_version=17, dynamo=False)
    return path, work / "byte_calib.npz", work / "byte_eval.npz"


def build_wide_mlp(work: Path, seed: int) -> tuple[Path, Path, Path]:
    from benchmarks.latency import prepare_wide_mlp

    bench = prepare_wide_mlp(work, seed)
    return bench.model, bench.calib, bench.eval


MODELS = {"byte_classifier": build_byte_classifier, "wide_mlp": build_wide_mlp}


# ----------------------------------------------------------------------------- one row (child process)
def _row_ort(model: Path, calib: Path, out: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = dict(np.load(calib))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(data.values())))
            self.it = iter([{k: v[i:i + 32] for k, v in data.items()} for i in range(0, n, 32)])

        def get_next(self):
            return next(self.it, None)

    w0, c0 = time.perf_counter(), time.process_time()
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"total_s": wall, "total_cpu_s": cpu, "comparable_s": wall, "comparable_cpu_s": cpu}


def _row_ours(method: str, model: Path, calib: Path, held: Path, out: Path, device: str = "cpu") -> dict:
    import torch  # noqa: F401 - imported before the clock starts, as onnxruntime.quantization above

    from fls_compress import GPTQConfig, RTNConfig, RunOptions, compress
    from fls_compress.configs.quantize import FLSQuantConfig

    extra = {"max_rows_per_layer": 65536} if method == "gptq-64k" else {}
    config = {"gptq": GPTQConfig, "gptq-64k": GPTQConfig, "rtn": RTNConfig, "fls": FLSQuantConfig}[method](
        bits=8, activations="int8", **extra)
    if device == "cuda":  # CUDA context and kernels warmed outside the clock, as the imports
        torch.ones(1, device="cuda").sum().item()
    w0, c0 = time.perf_counter(), time.process_time()
    rep = compress(model, config, calib, output=out, eval_data=held, options=RunOptions(seed=0, progress=False, device=device))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    t, c, info = rep["timing_s"], rep.get("timing_cpu_s", {}), rep.get("method_info", {})
    row = {"total_s": wall, "total_cpu_s": cpu}
    for stage in ("verify", "latency", "write"):
        row[f"{stage}_s"], row[f"{stage}_cpu_s"] = t.get(stage), c.get(stage)
    row["comparable_s"] = wall - t.get("verify", 0.0) - t.get("latency", 0.0)
    row["comparable_cpu_s"] = cpu - c["verify"] - c["latency"] if "verify" in c else None
    quant = t.get("convert", 0.0) + t["quantize"]
    stages = {"capture": "capture", "hessian": "hessian", "sweep": "transform", "act ranges": "act_ranges"}
    for label, key in stages.items():
        row[f"{label}_s"], row[f"{label}_cpu_s"] = info.get(f"time_{key}_s"), info.get(f"time_{key}_cpu_s")
    known = [row[f"{label}_s"] for label in stages if row[f"{label}_s"] is not None]
    row["other quantize_s"] = quant - sum(known) if known else quant
    if "compress" in c:
        row["other quantize_cpu_s"] = c["compress"] - sum(row[f"{label}_cpu_s"] or 0.0 for label in stages)
    row["load_s"] = wall - quant - sum(t.get(k, 0.0) for k in ("write", "verify", "latency"))
    row["load_cpu_s"] = cpu - c["compress"] - sum(c.get(k, 0.0) for k in ("write", "verify", "latency")) if c else None
    out_info = rep["verification"]["outputs"]
    first = next(iter(out_info.values()))
    row["top1_agreement"] = first.get("top1_agreement")
    row["relative_l2_error"] = first.get("relative_l2_error")
    row["kernels"] = ((rep.get("latency") or {}).get("kernels") or {}).get("compressed", {}).get("integer_kernels")
    row["activation_ranges_from_capture"] = info.get("activation_ranges_from_capture")
    return row


def _row_cli(model: Path, calib: Path, held: Path, out: Path, pythonpath: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "quantize", str(model), "--bits", "8", "--activations", "int8",
                           "-m", "gptq", "--data", str(calib), "--eval-data", str(held), "-o", str(out), "--no-progress"],
                          cwd=pythonpath, env={**os.environ, "PYTHONPATH": pythonpath}, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-500:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"total_s": wall, "total_cpu_s": cpu}


ROWS = ["ort quantize_static", "ours rtn W8A8", "ours gptq W8A8", "ours gptq-64k W8A8", "CLI gptq W8A8"]
#: not in the default set: FLS (the CLI's default method) fits FishLeg's Q with Fisher-vector products,
#: minutes on 2 CPU cores for the byte classifier; ``--rows ...,"ours fls W8A8" --device cuda`` on a GPU
OPTIONAL_ROWS = ["ours fls W8A8"]


def child(args: argparse.Namespace) -> int:
    model, calib, held, out = Path(args.model), Path(args.calib), Path(args.held), Path(args.artifact)
    if args.child == "ort quantize_static":
        row = _row_ort(model, calib, out)
    elif args.child == "CLI gptq W8A8":
        row = _row_cli(model, calib, held, out, args.pythonpath)
    else:
        row = _row_ours(args.child.split()[1], model, calib, held, out, args.device)
    row["size_bytes"] = out.stat().st_size
    print(json.dumps(row))
    return 0


# ----------------------------------------------------------------------------- driver
def run_row(row: str, paths: tuple[Path, Path, Path], artifact: Path, pythonpath: str, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--child", row, "--device", device, "--model", str(paths[0]), "--calib", str(paths[1]),
           "--held", str(paths[2]), "--artifact", str(artifact), "--pythonpath", pythonpath]
    path = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's path
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


COLUMNS = ["load", "capture", "hessian", "sweep", "act ranges", "other quantize", "write", "verify", "latency"]


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def render(result: dict) -> str:
    repeat = max((r.get("repeats", 1) for r in result["rows"]), default=1)
    lines = ["# Quantize cost: W8A8 next to onnxruntime quantize_static", "",
             f"onnxruntime {result['onnxruntime']}, torch {result['torch']}, {result['cpu_count']} CPU cores"
             + (f", our rows calibrating on {result['gpu']} (CUDA)" if result.get("gpu") else "")
             + " (wall times carry the machine's load; CPU = process CPU seconds, all threads). Each row in a fresh "
             f"process, rows interleaved, the fastest of {repeat} run(s) per row; imports outside the clock except for "
             "the CLI row. `comparable` = what quantize_static does "
             "(load, quantize, write; ours: compress() minus verification and latency). Cells: wall s / CPU s.", ""]
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        ort = next((r for r in rows if r["row"] == "ort quantize_static" and r["status"] == "ok"), None)
        lines += [f"## {model}", "", "| row | comparable | x ort | total | " + " | ".join(COLUMNS) + " | agreement | rel. L2 | size MB |",
                  "|---" * (7 + len(COLUMNS)) + "|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['row']} | {r['status']} |" + " |" * (5 + len(COLUMNS)))
                continue
            ratio = r["comparable_s"] / ort["comparable_s"] if ort and r.get("comparable_s") else None
            cells = [f"{_f(r.get(c + '_s'))} / {_f(r.get(c + '_cpu_s'))}" if r.get(c + "_s") is not None else "-" for c in COLUMNS]
            lines.append(f"| {r['row']} | {_f(r.get('comparable_s'))} / {_f(r.get('comparable_cpu_s'))} | {_f(ratio, '.2f')} | "
                         f"{_f(r['total_s'])} / {_f(r['total_cpu_s'])} | " + " | ".join(cells) +
                         f" | {_f(r.get('top1_agreement'), '.3f')} | {_f(r.get('relative_l2_error'), '.5f')} | {r['size_bytes'] / 1e6:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS + OPTIONAL_ROWS))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where our rows calibrate (RunOptions.device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (interleaved); the fastest is reported")
    ap.add_argument("--pythonpath", default=str(ROOT), help="checkout whose fls_compress our rows run (default: this one)")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. _before)")
    for hidden in ("--child", "--model", "--calib", "--held", "--artifact"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    import onnxruntime as ort
    import torch

    models, rows = args.models.split(","), args.rows.split(",")
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(rows) - set(ROWS + OPTIONAL_ROWS))
    if unknown:
        ap.error(f"unknown model(s)/row(s): {', '.join(unknown)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="fls-quantize-cost-") as tmp:
        for name in models:
            work = Path(tmp) / name
            work.mkdir()
            paths = MODELS[name](work, args.seed)
            best: dict[str, dict] = {}
            for rep in range(args.repeat):  # rows interleaved; per row the run with the least comparable/total wall
                for i, row in enumerate(rows):
                    got = {"model": name, "row": row, **run_row(row, paths, work / f"{i}.onnx", args.pythonpath, args.device)}
                    print(json.dumps(got), file=sys.stderr, flush=True)
                    key = "comparable_s" if "comparable_s" in got else "total_s"
                    if row not in best or (got["status"] == "ok" and (best[row]["status"] != "ok" or got[key] < best[row][key])):
                        best[row] = {**got, "repeats": args.repeat}
            results += [best[row] for row in rows]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None
    result = {"onnxruntime": ort.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(), "device": args.device, "gpu": gpu,
              "pythonpath": args.pythonpath, "rows": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quantize_cost{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result)
    (args.out / f"quantize_cost{args.tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
