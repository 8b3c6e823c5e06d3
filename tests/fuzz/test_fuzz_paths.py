"""Output and report paths: no output may touch an input or another output (exit 2, before any work),
an unwritable destination is exit 7, and neither leaves temp files, staging directories or a model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest

from . import harness as h


@pytest.fixture
def work(files, tmp_path) -> dict[str, Path]:
    """A private copy of the inputs whose collisions are tested (so links and renames stay local)."""
    d = tmp_path / "in put ✓"
    d.mkdir()
    w = {"dir": d}
    for key in ("mlp", "calib", "labels_npy", "x_npy"):
        w[key] = d / files[key].name
        shutil.copy(files[key], w[key])
    ext = d / "ext"
    ext.mkdir()
    w["ext"] = ext / "ext.onnx"
    onnx.save(h.mlp(), w["ext"], save_as_external_data=True, location="weights.bin", size_threshold=0)
    w["ext_data"] = ext / "weights.bin"
    odd = d / "odd"
    odd.mkdir()
    w["odd"] = odd / "model.onnx"
    onnx.save(h.mlp(), w["odd"], save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    w["hardlink"] = d / "hard.onnx"
    os.link(w["mlp"], w["hardlink"])
    w["symlink"] = d / "sym.onnx"
    w["symlink"].symlink_to(w["mlp"])
    w["data_link"] = d / "data link.json"
    os.link(w["calib"], w["data_link"])
    w["ext_link"] = d / "ext data link.json"
    os.link(w["ext_data"], w["ext_link"])
    return w


# (model key, -o, --report, extra options, fragment); paths are keys of `work` or "new:<name>" under the dir
COLLISIONS = [
    ("mlp", "mlp", "new:r.json", (), "would be overwritten"),
    ("mlp", "hardlink", "new:r.json", (), "would be overwritten"),
    ("mlp", "symlink", "new:r.json", (), "would be overwritten"),
    ("mlp", "rel:mlp", "new:r.json", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "mlp", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "hardlink", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "calib", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "data_link", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "labels_npy", ("--labels", "labels_npy"), "would be overwritten"),
    ("mlp", "new:o.onnx", "x_npy", ("--eval-data", "x_npy"), "would be overwritten"),
    ("mlp", "calib", "new:r.json", (), "would be overwritten"),
    ("mlp", "new:o.onnx", "new:o.onnx", (), "same file"),
    ("mlp", "new:o.onnx", "new:o.onnx.data", (), "same file"),
    ("ext", "new:o.onnx", "ext_data", (), "external data"),
    ("ext", "new:o.onnx", "ext_link", (), "external data"),
    ("ext", "ext_data", "new:r.json", (), "external data"),
    ("odd", "odd_out", "new:r.json", (), "external data"),
]


def _resolve(work: dict[str, Path], spec: str) -> Path:
    if spec.startswith("new:"):
        return work["dir"] / spec[4:]
    if spec.startswith("rel:"):
        target = work[spec[4:]]  # a relative, unnormalised spelling of the same file
        return Path(os.path.relpath(target.parent)) / ".." / target.parent.name / "." / target.name
    if spec == "odd_out":
        return work["odd"].parent / "out.onnx"
    return work[spec]


@pytest.mark.parametrize("model, output, report, extra, fragment", COLLISIONS,
                         ids=[f"o={c[1]}-r={c[2]}{'-' + c[3][0] if c[3] else ''}" for c in COLLISIONS])
def test_output_and_report_collisions_exit_2_before_any_work(capsys, work, model, output, report, extra, fragment):
    before = h.digests([work["dir"]])
    listing = sorted(p.relative_to(work["dir"]) for p in work["dir"].rglob("*"))
    out, rep = _resolve(work, output), _resolve(work, report)
    extra = [work[a] if a in work else a for a in extra]
    res = h.cli(capsys, "prune", work[model], "-o", out, "--report", rep, "--data", work["calib"], *extra, *h.MAGNITUDE)
    safe_report = report == "new:r.json"  # a report path that is itself fine still gets the failure report
    doc = h.check_failure(res, 2, fragment, before=before, report=rep if safe_report else None, report_expected=safe_report)
    created = [Path("r.json")] if safe_report else []
    assert sorted(p.relative_to(work["dir"]) for p in work["dir"].rglob("*")) == sorted(listing + created)
    assert doc is not None and doc["error_class"] == "InvalidOptionError"  # at least on stdout


def test_verify_report_over_its_inputs(capsys, work):
    before = h.digests([work["dir"]])
    for target in ("mlp", "hardlink", "calib"):
        res = h.cli(capsys, "verify", work["mlp"], work["hardlink"], "--data", work["calib"], "--report", work[target])
        h.check_failure(res, 2, "would be overwritten", before=before)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory nothing can be created in (chmod for users; /proc when running as root)."""
    if os.geteuid() == 0:
        yield Path("/proc")
        return
    d = tmp_path / "read only"
    d.mkdir()
    d.chmod(0o555)
    yield d
    d.chmod(0o755)


UNWRITABLE = [
    ("dir", "o.onnx", "new:r.json"),       # -o in a directory nothing can be created in
    ("dir", "sub/o.onnx", "new:r.json"),   # ... nor its missing parents
    ("isdir", None, "new:r.json"),          # -o is a directory
    ("underfile", None, "new:r.json"),      # -o's parent is a file
    ("new:o.onnx", None, "dir"),            # --report in an unwritable directory
    ("new:o.onnx", None, "isdir"),          # --report is a directory
    ("new:o.onnx", None, "underfile"),      # --report's parent is a file
]


@pytest.mark.parametrize("output, sub, report", UNWRITABLE, ids=[f"o={o}{'/' + s if s else ''}-r={r}" for o, s, r in UNWRITABLE])
def test_unwritable_destinations_exit_7_before_any_work(capsys, work, unwritable, tmp_path, output, sub, report):
    before = h.digests([work["dir"]])
    a_dir = tmp_path / "a directory.onnx"
    a_dir.mkdir()
    a_file = tmp_path / "plain file"
    a_file.write_text("x")

    def where(spec: str, name: str) -> Path:
        if spec == "dir":
            return unwritable / (sub or name)
        if spec == "isdir":
            return a_dir
        if spec == "underfile":
            return a_file / name
        return tmp_path / spec[4:]

    out, rep = where(output, "o.onnx"), where(report, "r.json")
    res = h.cli(capsys, "prune", work["mlp"], "-o", out, "--report", rep, "--data", work["calib"], *h.MAGNITUDE)
    writable_report = report.startswith("new:")
    doc = h.check_failure(res, 7, "writ" if output == "dir" or report == "dir" else str(a_dir.name if "isdir" in (output, report) else a_file.name),
                          before=before, report=rep if writable_report else None, report_expected=writable_report)
    assert doc is not None and doc["error_class"] == "OutputError"  # on stdout when it cannot go to --report
    assert not out.is_file() and a_file.read_text() == "x" and list(a_dir.iterdir()) == []
    assert h.stray_files(tmp_path) == []


def test_missing_output_directories_are_created(capsys, work, tmp_path):
    before = h.digests([work["dir"]])
    out = tmp_path / "new ✓" / "deeper" / "o.onnx"
    rep = tmp_path / "reports" / "r.json"
    res = h.cli(capsys, "prune", work["mlp"], "-o", out, "--report", rep, "--data", work["calib"], *h.MAGNITUDE)
    doc = h.check_success(res, out, before)
    assert h.strict_loads(rep.read_text()) == doc
    assert h.stray_files(rep.parent) == []


def test_existing_output_is_replaced_atomically(capsys, work, tmp_path):
    """An existing -o (not an input) is replaced; a hard link to it elsewhere keeps the old bytes."""
    before = h.digests([work["dir"]])
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old contents")
    keep = tmp_path / "keep"
    os.link(out, keep)
    res = h.cli(capsys, "prune", work["mlp"], "-o", out, "--data", work["calib"], *h.MAGNITUDE)
    h.check_success(res, out, before)
    assert keep.read_bytes() == b"old contents"
