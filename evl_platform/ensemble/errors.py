"""Errors of the ensemble tools that the CLI reports as one line."""

from __future__ import annotations


class EnsembleError(ValueError):
    """A score file or run that cannot be read, or two score tables that do not match."""
