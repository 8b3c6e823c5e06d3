"""Progress of a batch on stderr: a rich bar with jobs done / failed / running and the ETA."""

from __future__ import annotations

import sys
from typing import Any


class BatchProgress:
    """A rich progress bar over the jobs of a batch (a no-op when ``enabled`` is False)."""

    def __init__(self, total: int, *, enabled: bool = True, done: int = 0):
        self.total, self.done, self.failed = total, done, 0
        self.progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=sys.stderr), transient=False,
        )
        self.task = self.progress.add_task("batch", total=total, completed=done, state="")

    def __enter__(self) -> "BatchProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, running: list[str], finished_row: dict[str, Any] | None = None) -> None:
        if finished_row is not None:
            self.done += 1
            self.failed += finished_row.get("status") != "ok"
        if self.progress is None:
            return
        state = f"ok {self.done - self.failed}  failed {self.failed}  running {len(running)}"
        if running:
            state += " (" + ", ".join(running[:3]) + (", ..." if len(running) > 3 else "") + ")"
        self.progress.update(self.task, completed=self.done, state=state)

    def echo(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr, flush=True)
