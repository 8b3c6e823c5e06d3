"""``quantize`` keeps the same pipeline contract as ``prune`` (it shares the engine, the path guard and the
report): a representative subset of the cases, with the cheap round-to-nearest method."""

from __future__ import annotations

import pytest

from . import harness as h

RTN = ("-m", "rtn", "--no-progress")


@pytest.mark.parametrize("bits", ["8", "4"])
def test_quantize_succeeds_and_leaves_inputs_alone(capsys, files, outdir, inputs_before, bits):
    out = outdir / "q ✓.onnx"
    res = h.cli(capsys, "quantize", files["mlp"], "-o", out, "--data", files["calib"], "--bits", bits, *RTN)
    doc = h.check_success(res, out, inputs_before)
    assert doc["command"] == "quantize"


CASES = [
    (("model", "truncated"), (), 3, "truncated.onnx"),
    (("model", "noext"), (), 3, "noext.onnx"),
    (("model", "mlp"), ("--data", "inf"), 5, "inf"),
    (("model", "mlp"), ("--data", "pickled"), 5, "pickle"),
    (("model", "mlp"), ("--data", "short_labels"), 5, "labels"),
    (("model", "mlp"), ("--bits", "5"), 2, "--bits"),
    (("model", "mlp"), ("--bits", "3"), 2, "--bits"),
    (("model", "mlp"), ("--granularity", "block:0"), 2, "granularity"),
    (("model", "mlp"), ("--granularity", "bogus"), 2, "granularity"),
    (("model", "mlp"), ("--sparsity", "nan"), 2, "--sparsity"),
    (("model", "mlp"), ("--percdamp", "nan", "-m", "gptq"), 2, "--percdamp"),
]


@pytest.mark.parametrize("model, extra, code, fragment", CASES, ids=[f"{m[1]}-{' '.join(e)}" for m, e, _, _ in CASES])
def test_quantize_failures(capsys, files, outdir, inputs_before, model, extra, code, fragment):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    extra = [str(files[a]) if a in files and a != "mlp" else a for a in extra]
    data = () if "--data" in extra else ("--data", files["calib"])
    method = () if "-m" in extra else ("-m", "rtn")
    res = h.cli(capsys, "quantize", files[model[1]], "-o", out, "--report", rep, *data, *method, *extra, "--no-progress")
    h.check_failure(res, code, fragment, before=inputs_before, output=out, report=rep, report_expected=True)


def test_quantize_output_collisions(capsys, files, outdir, inputs_before):
    for target in (files["ext"], files["calib"], files["ext_data"]):
        res = h.cli(capsys, "quantize", files["ext"], "-o", outdir / "o.onnx", "--report", target, "--data", files["calib"], *RTN)
        h.check_failure(res, 2, "would be overwritten", before=inputs_before, output=outdir / "o.onnx")
    res = h.cli(capsys, "quantize", files["mlp"], "-o", files["mlp"], "--data", files["calib"], *RTN)
    h.check_failure(res, 2, "would be overwritten", before=inputs_before)
