"""Wall and process-CPU seconds per named stage, for the report's ``method_info`` (``<stage>_s`` fields).

CPU time is the whole process's (:func:`time.process_time`, every thread): on a machine shared with
other jobs it shows the work done where wall time also shows the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class StageClock:
    """Accumulates seconds per stage: ``with clock("capture"): ...`` or ``for x in clock.iterate("capture", it)``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - w0
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c0

    def iterate(self, stage: str, items: Iterator[T]) -> Iterator[T]:
        """``items`` with the time spent producing each one counted to ``stage``."""
        while True:
            with self(stage):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item

    def fields(self, prefix: str = "time_") -> dict[str, float]:
        """``{prefix}<stage>_s`` (wall) and ``{prefix}<stage>_cpu_s`` per stage."""
        out: dict[str, float] = {}
        for stage in self.wall:
            out[f"{prefix}{stage}_s"] = self.wall[stage]
            out[f"{prefix}{stage}_cpu_s"] = self.cpu[stage]
        return out
