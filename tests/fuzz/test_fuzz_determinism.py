"""The same command twice with the same --seed gives byte-identical models and equal reports (timings aside)."""

from __future__ import annotations

import pytest

from . import harness as h

VOLATILE = ("timing_s", "timing_cpu_s", "latency")  # wall-clock and CPU seconds: the latency block is a measurement, not a result


def _stable(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k not in VOLATILE}
    doc["output"] = {k: v for k, v in doc.get("output", {}).items() if k != "path"}
    doc["method_info"] = {k: v for k, v in (doc.get("method_info") or {}).items() if not _is_timing(k)}
    doc["steps"] = [{k: v for k, v in s.items() if not _is_timing(k)} for s in doc.get("steps") or []]
    return doc


def _is_timing(key: str) -> bool:
    """Wall-clock measurements (``fit_seconds``, ``convert_s``, ``aux_steps_per_s``...) vary run to run."""
    return key.endswith(("seconds", "_s", "_per_s", "_time"))


@pytest.mark.parametrize("method", ["fls", "sparsegpt", "obert"])
def test_same_seed_gives_byte_identical_models_and_reports(capsys, files, tmp_path, method, inputs_before):
    extra = {"fls": ("--fit-steps", "3", "--refit-steps", "1", "--moment-samples", "16", "--steps", "2"),
             "sparsegpt": ("-m", "sparsegpt"),
             "obert": ("-m", "obert", "--num-grads", "16", "--block-size", "8", "--steps", "2")}[method]
    models, reports = [], []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "-s", "0.6", "--seed", "7",
                    "--threads", "1", "--no-progress", *extra)
        doc = h.check_success(res, out, inputs_before)
        models.append(out.read_bytes())
        reports.append(_stable(doc))
    assert models[0] == models[1]
    assert reports[0] == reports[1]


def test_a_different_seed_changes_the_calibration_split(capsys, files, tmp_path, inputs_before):
    """The seed is really used: another seed draws another hold-out split, so other FLS weights."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"s{seed}.onnx"
        res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", files["calib"], "-s", "0.6", "--seed", seed,
                    "--threads", "1", "--fit-steps", "3", "--refit-steps", "0", "--moment-samples", "16", "--steps", "1",
                    "--no-progress")
        h.check_success(res, out, inputs_before)
        outs.append(out.read_bytes())
    assert outs[0] != outs[1]
