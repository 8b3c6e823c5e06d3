"""Progress reporting on stderr: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("fls_compress")


@contextmanager
def stage_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(message)``: one call per finished unit of work out of ``total``."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        emit = log.info if enabled else log.debug  # progress=False: no progress lines at the default level

        def advance(message: str) -> None:
            emit(message)

        yield advance
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(message: str) -> None:
            bar.update(task, advance=1, description=message)

        yield advance


def configure_logging(verbosity: int = 0, quiet: bool = False) -> None:
    """Logs go to stderr; results go to stdout/JSON."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("fls_compress")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
