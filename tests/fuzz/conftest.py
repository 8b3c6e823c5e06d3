"""Fixtures of the robustness suite: one directory of tiny models and data files, built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from . import harness as h


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Valid and broken inputs; the cases refer to them by key."""
    d = tmp_path_factory.mktemp("fuzz inputs ü")  # a space and a non-ASCII letter in every path
    f: dict[str, Path] = {"dir": d}

    def save(key: str, model: onnx.ModelProto, name: str | None = None) -> None:
        f[key] = d / (name or f"{key}.onnx")
        onnx.save(model, f[key])

    save("mlp", h.mlp())
    save("batch1", h.mlp(batch=1))
    save("fp16", h.linear(np.float16))
    save("fp64", h.linear(np.float64))
    save("embed", h.embedding())
    save("multi", h.two_in_two_out())
    save("custom", h.custom_op())
    save("noweights", h.no_weights())
    save("checker", h.checker_failure())
    save("unicode", h.mlp(), "modèle très ünïcode ✓.onnx")

    good = f["mlp"].read_bytes()
    for key, payload in {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": good[: len(good) // 2],
        "text": b"ir_version: 8\nthis is not a binary protobuf\n",
    }.items():
        f[key] = d / f"{key}.onnx"
        f[key].write_bytes(payload)
    f["tensorproto"] = d / "tensorproto.onnx"
    f["tensorproto"].write_bytes(onnx.numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString())
    f["adir"] = d / "a directory.onnx"
    f["adir"].mkdir()

    ext = d / "external"
    ext.mkdir()
    f["ext"] = ext / "ext.onnx"
    onnx.save(h.mlp(), f["ext"], save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    f["ext_data"] = ext / "ext.onnx.data"
    miss = d / "missing_ext"
    miss.mkdir()
    f["noext"] = miss / "noext.onnx"
    onnx.save(h.mlp(), f["noext"], save_as_external_data=True, location="noext.onnx.data", size_threshold=0)
    (miss / "noext.onnx.data").unlink()
    # a model whose external-data file is named like another model's "<output>.data"
    odd = d / "oddext"
    odd.mkdir()
    f["oddext"] = odd / "model.onnx"
    onnx.save(h.mlp(), f["oddext"], save_as_external_data=True, location="out.onnx.data", size_threshold=0)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=64)

    def npz(key: str, **arrays) -> None:
        f[key] = d / f"{key}.npz"
        np.savez(f[key], **arrays)

    npz("calib", x=x, labels=y)
    npz("calib1", x=np.ones((1, 1, 16), np.float32)[0])
    npz("calib_fp16", x=rng.normal(size=(32, 8)).astype(np.float16))
    npz("calib_fp64", x=rng.normal(size=(32, 8)))
    npz("ids", ids=rng.integers(0, 10, size=(32, 4)))
    npz("ids_oob", ids=np.full((32, 4), 12))
    npz("ids_neg", ids=np.full((32, 4), -11))
    npz("multi_data", a=rng.normal(size=(32, 6)).astype(np.float32), b=rng.normal(size=(32, 6)).astype(np.float32))
    npz("wrong_name", z=x)
    npz("missing_input", a=rng.normal(size=(32, 6)).astype(np.float32))
    npz("inf", x=np.where(np.arange(16) == 3, np.inf, x))
    npz("neginf", x=np.where(np.arange(16) == 5, -np.inf, x))
    npz("zero", x=x[:0])
    npz("one", x=x[:1])
    npz("complex", x=x.astype(np.complex64))
    npz("strings", x=np.array([["a"] * 16] * 4))
    npz("bools", x=x > 0)
    npz("rank3", x=x[:, None, :])
    npz("short_labels", x=x, labels=y[:10])
    npz("oob_labels", x=x, labels=np.full(64, 4))
    npz("neg_labels", x=x, labels=np.full(64, -1))
    npz("float_labels", x=x, labels=y.astype(np.float32) + 0.5)
    npz("labels_2d", x=x, labels=np.stack([y, y], 1))
    npz("ragged", x=x, extra=x[:3])
    f["pickled"] = d / "pickled.npz"
    f["pickle_marker"] = d / "UNPICKLED"
    np.savez(f["pickled"], x=np.array([_Boom(str(f["pickle_marker"]))] * 4, dtype=object), allow_pickle=True)
    f["pickled_npy"] = d / "pickled.npy"
    np.save(f["pickled_npy"], np.array([_Boom(str(f["pickle_marker"]))], dtype=object), allow_pickle=True)
    f["garbage_npz"] = d / "garbage.npz"
    f["garbage_npz"].write_bytes(b"PK\x03\x04" + rng.bytes(200))
    f["empty_npz"] = d / "empty.npz"
    f["empty_npz"].write_bytes(b"")
    f["nothing_npz"] = d / "nothing.npz"
    np.savez(f["nothing_npz"])
    f["x_npy"] = d / "x.npy"
    np.save(f["x_npy"], x)
    f["x1d_npy"] = d / "x1d.npy"
    np.save(f["x1d_npy"], x[0])
    f["labels_npy"] = d / "labels.npy"
    np.save(f["labels_npy"], y)
    f["short_labels_npy"] = d / "short_labels.npy"
    np.save(f["short_labels_npy"], y[:5])
    f["empty_dir"] = d / "empty data dir"
    f["empty_dir"].mkdir()
    f["garbage_st"] = d / "weights.safetensors"
    f["garbage_st"].write_bytes(rng.bytes(64))
    return f


class _Boom:
    """Unpickling this creates a file: a data loader that unpickles would be caught by the marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out dir ✓"
    d.mkdir()
    return d


@pytest.fixture
def inputs_before(files) -> dict[Path, str]:
    """sha256 of every input file, taken before the case runs."""
    return h.digests([files["dir"]])
