"""Seeded random mutations of a valid model file and a valid data file: whatever the bytes, the run ends
with a documented exit code (never 1, an internal error), one ``error:`` line on failure, strict JSON on
stdout, the inputs unchanged and nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest

from . import harness as h

ALLOWED = {0: None, 2: "InvalidOptionError", 3: "InvalidModelError", 4: "UnsupportedModelError",
           5: "InvalidDataError", 6: "VerificationError"}


def _mutate(payload: bytes, seed: int) -> bytes:
    """Flip 1-8 random bytes, or cut the file, or splice a random block into it."""
    rng = np.random.default_rng(seed)
    data = bytearray(payload)
    kind = seed % 3
    if kind == 0:
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
            data[pos] = int(rng.integers(0, 256))
    elif kind == 1:
        data = data[: int(rng.integers(1, len(data)))]
    else:
        pos = int(rng.integers(0, len(data)))
        data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
    return bytes(data)


def _check(res: h.Result, before: dict, out, rep) -> None:
    assert res.code in ALLOWED, (res.code, res.err[-2000:])
    assert "Traceback" not in res.err, res.err
    assert h.digests(before) == before
    assert h.stray_files(out.parent) == []
    if res.code == 0:
        assert res.errors == [] and res.json()["status"] == "ok"
        return
    assert len(res.errors) == 1, res.err
    assert not out.exists()
    doc = h.strict_loads(rep.read_text())
    assert doc["status"] == "failed" and doc["exit_code"] == res.code and doc["error_class"] == ALLOWED[res.code]


@pytest.mark.parametrize("seed", range(24))
def test_mutated_model_files(capsys, files, tmp_path, seed):
    model = tmp_path / "mutant.onnx"
    model.write_bytes(_mutate(files["mlp"].read_bytes(), seed))
    before = h.digests([model, files["calib"]])
    out, rep = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    res = h.cli(capsys, "prune", model, "-o", out, "--data", files["calib"], "--report", rep, *h.MAGNITUDE)
    _check(res, before, out, rep)


@pytest.mark.parametrize("seed", range(24))
def test_mutated_data_files(capsys, files, tmp_path, seed):
    data = tmp_path / "mutant.npz"
    data.write_bytes(_mutate(files["calib"].read_bytes(), seed))
    before = h.digests([files["mlp"], data])
    out, rep = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    res = h.cli(capsys, "prune", files["mlp"], "-o", out, "--data", data, "--report", rep, "-m", "sparsegpt", "--no-progress")
    _check(res, before, out, rep)
