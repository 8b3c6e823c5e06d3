"""Options of one compression run that are not a method's knobs: data handling, output, gates, device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import InvalidOptionError
from .base import Config, knob

DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class RunOptions(Config):
    panel: ClassVar[str] = "Run"

    seed: int = knob(0, "Random seed: runs are deterministic for a given seed (and thread count).", min=0, max=2**32 - 1)
    num_calibration: int = knob(1024, "Calibration samples used at most.", min=1, max=10_000_000)
    holdout_fraction: float = knob(0.2, "Fraction of --data held out for verification when --eval-data is not given.",
                                   min=0.0, min_open=True, max=0.9)
    device: str = knob("cpu", "Where calibration runs: cpu, cuda, or auto (cuda when available).", choices=DEVICES)
    threads: int | None = knob(None, "torch / onnxruntime intra-op threads (default: the libraries' own choice). "
                               "Outputs are byte-identical only for the same thread count.", min=1, max=1024)
    sparse_storage: bool = knob(False, "Store pruned tensors as ONNX sparse_initializer where that is smaller (disk only).")
    min_agreement: float | None = knob(None, "Fail (exit 6) if top-1 agreement with the original is below this (classifiers).",
                                       min=0.0, max=1.0)
    max_rel_error: float | None = knob(None, "Fail (exit 6) if any output's relative L2 error exceeds this.", min=0.0)
    min_cosine: float | None = knob(None, "Fail (exit 6) if any output's mean cosine similarity is below this.",
                                    min=-1.0, max=1.0)
    keep_failed: bool = knob(False, "Keep the compressed model at -o when a verification gate fails (the report says so).")
    progress: bool = knob(True, "Progress bar on stderr (on a terminal).")
    conversion_tol: float = knob(1e-3, "Largest relative L2 error of the converted torch graph against onnxruntime on a "
                                 "calibration batch before curvature methods stop (exit 4, naming the first diverging node).",
                                 min=0.0, min_open=True)
    allow_conversion_mismatch: bool = knob(False, "Use a torch graph that differs from onnxruntime above --conversion-tol "
                                           "anyway (a warning and conversion.mismatch_allowed in the report).")
    shape: tuple[str, ...] = knob((), "Size of synthetic inputs' dynamic dims, NAME=1x3x320x320 (repeatable; without --data).")
    const: tuple[str, ...] = knob((), "Value of a rank-0 input for all samples, NAME=VALUE (repeatable).")
    latency: bool = knob(True, "Time the original and compressed models with onnxruntime (batch 1 and the evaluation "
                                "batch) and census the kernels it runs; --no-latency skips it.")
    latency_runs: int = knob(10, "Timed runs per model and batch for the latency block (median, p10/p90).", min=1, max=10_000)

    def validate(self) -> None:
        super().validate()
        self.shapes  # noqa: B018  (parse now: a malformed value is an option error, before any work)
        self.consts  # noqa: B018
        if self.keep_failed and self.min_agreement is None and self.max_rel_error is None and self.min_cosine is None:
            raise InvalidOptionError("--keep-failed needs a verification gate (--min-agreement, --max-rel-error or --min-cosine)")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for item in self.shape:
            name, _, dims = item.partition("=")
            try:
                parsed = tuple(int(d) for d in dims.lower().split("x"))
            except ValueError:
                parsed = ()
            if not name or not parsed or any(d < 1 for d in parsed):
                raise InvalidOptionError(f"--shape must look like NAME=1x3x320x320 (positive sizes), got {item!r}")
            out[name] = parsed
        return out

    @property
    def consts(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in self.const:
            name, _, value = item.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not name or number != number or number in (float("inf"), float("-inf")):
                raise InvalidOptionError(f"--const must look like NAME=VALUE with a finite number, got {item!r}")
            out[name] = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        return out
