"""Headless progress printing: a kernel's streamed output condensed into readable terminal lines.

:class:`ProgressPrinter` prints each finished line and a progress bar when it starts, at most every ``interval``
seconds while it runs, and when it ends; :class:`StreamFile` is the file object papermill writes a cell stream to.
:func:`quiet_headless_kernel` sets up the kernels' environment: text progress bars (``REVELIO_PROGRESS=text``, see
:func:`use_text_progress`) throttled at the source, and papermill's parameter-parsing noise filtered. Used by
:mod:`revelio_nb.runner`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Callable, TextIO

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves of nested tqdm bars, colours


class ProgressPrinter:
    """Condenses a kernel's stdout/stderr into readable terminal lines.

    ``feed(stream_name, text)`` takes text as it arrives. Lines ended by ``\\n`` are printed (prefixed); the
    ``\\r``-separated updates of a progress bar are printed when a new bar starts and then at most every
    ``interval`` seconds; blank clears (a closing ``leave=False`` bar) and terminal escape sequences (nested bars'
    cursor moves) are dropped. Nothing printed holds ``\\r``.
    """

    def __init__(self, out: TextIO, prefix: str = "    ", interval: float = 30.0, width: int = 150,
                 clock: Callable[[], float] = time.monotonic):
        self.out, self.prefix, self.interval, self.width, self.clock = out, prefix, interval, width, clock
        self.pending: dict[str, str] = {}
        self.last_bar_print = -float("inf")
        self.last_bar_name: str | None = None
        self.last_line: str | None = None
        self.lines = 0

    def _print(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip() or line == self.last_line:
            return
        self.last_line = line
        if len(line) > self.width:
            line = line[: self.width - 3] + "..."
        self.out.write(f"{self.prefix}{line}\n")
        self.out.flush()
        self.lines += 1

    @staticmethod
    def _bar_name(line: str) -> str:
        """What stays the same across a bar's updates: its text up to the first digit (tqdm's ``desc``)."""
        return re.match(r"\D*", line).group(0).strip()

    def _bar_update(self, line: str) -> None:
        if not line.strip():
            return
        name, now = self._bar_name(line), self.clock()
        if name != self.last_bar_name or now - self.last_bar_print >= self.interval:
            self._print(line)
            self.last_bar_name, self.last_bar_print = name, now

    def feed(self, stream: str, text: str) -> None:
        text = ANSI_ESCAPE.sub("", text)
        pending = self.pending.get(stream, "")
        for piece in re.split(r"(\r\n|\r|\n)", text):
            if piece in ("\n", "\r\n"):
                self._print(pending)  # a finished line (a closed leave=True bar ends this way too)
                self.last_bar_name = None if self._bar_name(pending) == self.last_bar_name else self.last_bar_name
                pending = ""
            elif piece == "\r":
                self._bar_update(pending)
                pending = ""
            else:
                pending += piece
        self.pending[stream] = pending

    def close(self) -> None:
        for stream, pending in self.pending.items():
            self._print(pending)
        self.pending.clear()


class StreamFile:
    """The file-like object papermill writes one cell stream (stdout or stderr) to."""

    def __init__(self, printer: ProgressPrinter, name: str):
        self.printer, self.name = printer, name

    def write(self, text: str) -> int:
        self.printer.feed(self.name, text)
        return len(text)

    def flush(self) -> None:
        pass


def use_text_progress() -> None:
    """Make ``tqdm.auto`` draw text bars (to stderr) instead of notebook widgets, whose updates never reach a headless
    runner. Called by ``revelio_nb/__init__.py`` when ``REVELIO_PROGRESS=text`` (the runner sets it for its kernels)."""
    import tqdm.auto
    import tqdm.autonotebook
    import tqdm.std

    for module in (tqdm.auto, tqdm.autonotebook):
        module.tqdm, module.trange = tqdm.std.tqdm, tqdm.std.trange


class _DropPapermillNoise(logging.Filter):
    """The runner checks parameters itself (:func:`revelio_nb.run_plan.plan_parameters`); papermill's own line
    parser warns about parameter comments holding '=' and calls their parameters unknown, which would be false
    alarms."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Unable to parse line") or msg.startswith("Passed unknown parameter"))


@contextlib.contextmanager
def quiet_headless_kernel(progress_mininterval: float):
    """Environment for the kernels started inside: text progress bars, throttled at the source; papermill's
    parameter-parsing noise filtered; restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("REVELIO_PROGRESS", "TQDM_MININTERVAL")}
    os.environ["REVELIO_PROGRESS"] = "text"
    os.environ["TQDM_MININTERVAL"] = str(progress_mininterval)
    noise = _DropPapermillNoise()
    loggers = [logging.getLogger("papermill"), logging.getLogger("papermill.translators")]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
