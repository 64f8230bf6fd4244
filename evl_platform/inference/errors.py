"""Errors of the after-training commands (evaluate, predict, import-checkpoint)."""


class InferenceError(ValueError):
    """A run, checkpoint or option that cannot be used; ``str(err)`` says what and why."""
