"""The latent browser's error type."""

from __future__ import annotations

from ..run_index import RunIndexError


class BrowserError(RunIndexError):
    """A bad latent table, hookpoint or browser setting (the message names the value and the choices).

    A subclass of :class:`revelio_nb.run_index.RunIndexError` (a bad hookpoint index), so catching that catches
    both."""
