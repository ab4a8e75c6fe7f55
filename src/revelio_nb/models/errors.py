"""Errors of the models package."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model id, folder or embedded name could not be resolved or loaded."""
