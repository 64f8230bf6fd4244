"""Errors of training that the CLI reports as one line."""

from __future__ import annotations


class ResumeError(ValueError):
    """A ``--resume`` that cannot continue the run it names."""


class NonFiniteLossError(RuntimeError):
    """A training step's loss is NaN or infinite: the weights are lost, the run stops.

    Args:
        step: the step (counted from 1) whose loss is not finite.
        loss: that loss.
    """

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"step {step}: the training loss is {loss} (not finite); the run stops here "
            "(try a lower train.lr, or train.amp bfloat16 / none)"
        )
        self.step, self.loss = step, loss

    def __reduce__(self) -> tuple:
        return (type(self), (self.step, self.loss))
