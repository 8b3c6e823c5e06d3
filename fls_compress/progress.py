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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (a test harness or a CLI runner may
    swap and close the stream it had when the handler was made)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - a text stream
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - logging.StreamHandler assigns it once
        pass


def attach_cli_logging(verbosity: int = 0, quiet: bool = False) -> Callable[[], None]:
    """Route the ``fls_compress`` logs to stderr for one command-line invocation; returns the function that
    detaches the handler and restores the logger (the CLI calls it when the command ends). The library itself
    never installs handlers: without the CLI, records go wherever the application's logging sends them."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 1 else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fls_compress")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def detach() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return detach

