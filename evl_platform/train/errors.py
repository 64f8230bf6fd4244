"""Errors of the training launcher that the CLI reports as one line."""

from __future__ import annotations


class ResumeError(ValueError):
    """A ``--resume`` that cannot continue the run it names."""
