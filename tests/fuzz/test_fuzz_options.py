"""Option values a pipeline may pass: out of range, NaN, Inf, negative, 0 where >= 1, malformed.

Every one exits 2 with one ``error:`` line naming the option. Values that parse (numbers, choices) are
checked by the config after argument parsing, so a failure report is written to ``--report`` too;
text that is not a number at all is a usage error of the parser itself (no report: the arguments
were never understood).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from . import harness as h

# (extra argv, fragment of the error line); all use the default method fls unless -m is given
BAD_VALUES = [
    (["--sparsity", "inf"], "--sparsity"),
    (["--sparsity", "-inf"], "--sparsity"),
    (["--sparsity", "1e9"], "--sparsity"),
    (["--aux-lr", "nan"], "--aux-lr"),
    (["--aux-lr", "0"], "--aux-lr"),
    (["--aux-lr", "inf"], "--aux-lr"),
    (["--damping", "0"], "--damping"),
    (["--damping", "-1"], "--damping"),
    (["--damping", "nan"], "--damping"),
    (["--relative-damping", "-inf"], "--relative-damping"),
    (["--damping", "1", "--relative-damping", "1"], "--damping"),
    (["--holdout-fraction", "0"], "--holdout-fraction"),
    (["--holdout-fraction", "1"], "--holdout-fraction"),
    (["--holdout-fraction", "nan"], "--holdout-fraction"),
    (["--min-agreement", "nan"], "--min-agreement"),
    (["--min-agreement", "1.5"], "--min-agreement"),
    (["--max-rel-error", "-1"], "--max-rel-error"),
    (["--max-rel-error", "inf"], "--max-rel-error"),
    (["--min-cosine", "2"], "--min-cosine"),
    (["--min-cosine", "nan"], "--min-cosine"),
    (["--keep-failed"], "--keep-failed"),
    (["--pattern", "2:0"], "--pattern"),
    (["--pattern", "0:4"], "--pattern"),
    (["--pattern", "4:4"], "--pattern"),
    (["--pattern", "a:b"], "--pattern"),
    (["--pattern", "2:4", "--sparsity", "0.5"], "--pattern"),
    (["--q-form", "kron", "--block-size", "5"], "--block-size"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--fit-steps", "-1"], "--fit-steps"),
    (["--moment-samples", "0"], "--moment-samples"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-calibration", "0"], "--num-calibration"),
    (["--num-calibration", "-5"], "--num-calibration"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--output-name", "no_such_output"], "no_such_output"),
    (["-m", "sparsegpt", "--percdamp", "nan"], "--percdamp"),
    (["-m", "sparsegpt", "--percdamp", "-1"], "--percdamp"),
    (["-m", "sparsegpt", "--lazy-block", "0"], "--lazy-block"),
    (["-m", "obert", "--num-grads", "0"], "--num-grads"),
    (["-m", "obert", "--block-size", "0"], "--block-size"),
    (["-m", "magnitude", "--fit-steps", "3"], "--fit-steps"),
    (["-m", "magnitude", "--scope", "layer", "--pattern", "2:4"], "--scope"),
]


@pytest.mark.parametrize("args, fragment", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_out_of_range_values_exit_2_with_a_report(capsys, files, outdir, inputs_before, args, fragment):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    cheap = () if "-m" in args else ("--fit-steps", "0", "--refit-steps", "0")
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "--report", rep,
                *cheap, "--no-progress", *args)
    doc = h.check_failure(res, 2, fragment, before=inputs_before, output=out, report=rep, report_expected=True)
    assert doc["error_class"] == "InvalidOptionError"


UNPARSABLE = [
    (["--sparsity", "abc"], "--sparsity"),
    (["--sparsity", ""], "--sparsity"),
    (["--fit-steps", "1.5"], "--fit-steps"),
    (["--seed", "0x10"], "--seed"),
    (["--q-form", "diagonal"], "--q-form"),
    (["--device", "tpu"], "--device"),
    (["--no-such-option"], "--no-such-option"),
    (["--sparsity"], "--sparsity"),
]


@pytest.mark.parametrize("args, fragment", UNPARSABLE, ids=[" ".join(a) for a, _ in UNPARSABLE])
def test_unparsable_values_are_usage_errors(capsys, files, outdir, inputs_before, args, fragment):
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--report", rep, *args)
    h.check_failure(res, 2, fragment, before=inputs_before, output=out, report=rep, report_expected=False)
    assert res.out == ""


def test_every_weight_excluded_is_refused(capsys, files, outdir, inputs_before):
    """A usage error (exit 2) naming --exclude, with a failure report."""
    out, rep = outdir / "o.onnx", outdir / "r.json"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "--exclude", "*", "--report", rep, *h.MAGNITUDE)
    h.check_failure(res, 2, "--exclude", before=inputs_before, output=out, report=rep, report_expected=True)


@pytest.mark.parametrize("method", ["magnitude", "fls"])
def test_sparsity_zero_leaves_the_weights_unchanged(capsys, files, outdir, inputs_before, method):
    out = outdir / "o.onnx"
    extra = h.MAGNITUDE if method == "magnitude" else h.FAST_FLS
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "-s", "0", *extra)
    doc = h.check_success(res, out, inputs_before)
    assert doc["sparsity"]["achieved"] == 0.0
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(files["mlp"]).graph.initializer}
    for t in onnx.load(out).graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), before[t.name])
    assert doc["verification"]["outputs"]["logits"]["max_abs_error"] == 0.0


def test_extreme_but_valid_values(capsys, files, outdir, inputs_before):
    out = outdir / "o.onnx"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "-s", "0.999999",
                "--seed", str(2**32 - 1), "--num-calibration", "1", "--holdout-fraction", "0.9", *h.FAST_FLS)
    doc = h.check_success(res, out, inputs_before)
    assert doc["calibration"]["num_samples"] == 1
    assert doc["sparsity"]["achieved"] > 0.99
