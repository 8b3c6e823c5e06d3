"""Process-level settings of a run: seeds, thread counts, device choice, file hashes."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .errors import InvalidOptionError


def seed_everything(seed: int) -> None:
    """Make the run reproducible: Python, numpy and torch RNGs, deterministic torch kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_deterministic = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_deterministic is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:  # the same switch without importing torch._inductor (~2 s) only to set a compiler flag: nothing here compiles
        set_deterministic(True, warn_only=True)


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (onnxruntime sessions read :func:`ort_threads`)."""
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["FLS_COMPRESS_THREADS"] = str(threads)


def ort_threads() -> int:
    """Intra-op threads for onnxruntime sessions (0 = onnxruntime's default)."""
    return int(os.environ.get("FLS_COMPRESS_THREADS", "0"))


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` (refused when torch sees no CUDA device) or ``auto`` (cuda when available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise InvalidOptionError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


#: onnxruntime execution providers of verification and activation capture (see :func:`choose_ort_providers`)
_SESSION_PROVIDERS: list[str] = ["CPUExecutionProvider"]


def _cuda_ep_works() -> str | None:
    """``None`` when onnxruntime runs a session on its CUDA execution provider, else why not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (pip install fls-compress[gpu] for onnxruntime-gpu)"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        return f"onnxruntime's CUDAExecutionProvider failed to start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if "CUDAExecutionProvider" not in session.get_providers():
        return "onnxruntime's CUDAExecutionProvider did not start (no usable CUDA device or libraries)"
    return None


def choose_ort_providers(device: str) -> dict[str, object]:
    """Set the onnxruntime execution providers verification and activation capture use in this run,
    from the resolved ``device``: CUDA first on ``cuda`` when onnxruntime can run on it, else CPU
    with a warning (``fallback`` says why). Returns the report's ``onnxruntime`` section."""
    global _SESSION_PROVIDERS  # noqa: PLW0603 - one choice per run, read by every session of it
    fallback = None
    if device == "cuda":
        fallback = _cuda_ep_works()
        if fallback is not None:
            import logging

            logging.getLogger(__name__).warning(
                "--device cuda: %s; verification and activation capture run on CPUExecutionProvider", fallback)
    _SESSION_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" and fallback is None \
        else ["CPUExecutionProvider"]
    return {"device": device, "providers": list(_SESSION_PROVIDERS), "fallback": fallback}


def session_providers() -> list[str]:
    """The execution providers chosen by :func:`choose_ort_providers` (CPU until a run chooses)."""
    return list(_SESSION_PROVIDERS)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the block (``pthread_sigmask``), so a cleanup or a two-file rename
    finishes before :class:`~fls_compress.errors.Interrupted` is raised; pending signals arrive after it."""
    mask = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fast_matmul_backend(device: str | torch.device) -> str | None:
    """What :func:`fast_matmul` enables on ``device``: ``"bf16"`` (oneDNN, CPUs with AVX512-BF16 or AMX),
    ``"tf32"`` (CUDA) or ``None`` (no faster float32 path; the block then runs in full float32)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "tf32"
    if kind == "cpu" and torch.backends.mkldnn.is_available() and _native_bf16():
        return "bf16"
    return None


def fast_matmul_reason(device: str | torch.device, enabled: bool = True) -> str:
    """Why :func:`fast_matmul` runs in full float32 on ``device`` (for the report when it does)."""
    if not enabled:
        return "disabled (--fit-matmul float32)"
    kind = torch.device(device).type
    if kind == "cpu" and not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if kind == "cpu" and not _native_bf16():
        return "the CPU has no native bf16 dot products (AVX512-BF16 or AMX); emulated bf16 is no faster"
    if kind not in ("cpu", "cuda"):
        return f"no reduced-precision matmul path for device type {kind!r}"
    return "fast arithmetic is available"


def _native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); without them oneDNN's bf16
    path would be emulated and no faster."""
    cpu = torch.cpu
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in checks if f is not None)


@contextmanager
def fast_matmul(device: str | torch.device, enabled: bool = True) -> Iterator[str | None]:
    """Let float32 matmuls in the block use the backend's reduced-precision internal arithmetic
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` on CPU, ``torch.backends.cuda.matmul.fp32_precision
    = "tf32"`` on CUDA); inputs and outputs stay float32. Yields the backend used (``None``: unchanged), and
    restores the previous settings."""
    backend = fast_matmul_backend(device) if enabled else None
    if backend is None:
        yield None
        return
    knob = torch.backends.cuda.matmul if backend == "tf32" else torch.backends.mkldnn.matmul
    previous = knob.fp32_precision
    knob.fp32_precision = backend
    try:
        yield backend
    finally:
        knob.fp32_precision = previous
