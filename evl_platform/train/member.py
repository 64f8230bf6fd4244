"""The models a training loop trains, each with its own statistics and random numbers.

A run of its own is one :class:`Member`; a pack (several decoders on one frozen backbone, see
:mod:`evl_platform.train.pack`) is several, each drawing its dropout from its own
:class:`RngState` so that it draws what it would alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from evl_platform.train.errors import NonFiniteLossError
from evl_platform.train.step import Optimization, StepResult

if TYPE_CHECKING:
    from evl_platform.train.loop import Callback, Collective


@dataclass
class Window:
    """Training statistics of this worker's steps since the last logged step.

    Attributes:
        loss_sum: loss times clips, summed.
        hits: top-1 hits.
        clips: clips trained on.
        seconds: wall time of the steps (batch loading and the update; not logging,
            validation or checkpoints).
    """

    loss_sum: float = 0.0
    hits: int = 0
    clips: int = 0
    seconds: float = 0.0

    def add(self, result: StepResult, seconds: float) -> None:
        self.loss_sum += result.loss * result.clips
        self.hits += result.hits
        self.clips += result.clips
        self.seconds += seconds


@dataclass
class Member:
    """One model :func:`fit_members` trains: a run of its own, or one decoder of a pack.

    Attributes:
        key: its name among the loop's members (``""`` for a run of its own).
        net: the model under :class:`EVLForward` (DDP-wrapped with several workers).
        optimization: its optimizer, schedule, scaler, device and autocast dtype.
        callbacks: told about its steps and reports.
        rng: its own torch RNG state (dropout draws), swapped in around each of its steps so
            that it draws what it would alone; ``None`` uses the process's RNG (one member).
        failure: why it stopped (a non-finite loss); ``None`` while it trains.
        window: its training statistics since its last logged step.
    """

    key: str
    net: nn.Module
    optimization: Optimization
    callbacks: Sequence[Callback] = ()
    rng: RngState | None = None
    failure: NonFiniteLossError | None = None
    window: Window = field(default_factory=Window)

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Runs the block on this member's RNG state (no-op without one)."""
        if self.rng is None:
            yield
            return
        outer = RngState.capture(self.optimization.device)
        self.rng.restore()
        try:
            yield
        finally:
            self.rng = RngState.capture(self.optimization.device)
            outer.restore()


@dataclass
class RngState:
    """The torch RNG state of the CPU and, on CUDA, of the training device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @staticmethod
    def capture(device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return RngState(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def stop_non_finite(
    running: list[Member], results: Mapping[str, StepResult], step: int, collective: Collective
) -> list[Member]:
    """The members still running after ``step``: one whose loss is not finite on any worker
    stops (the workers agree, so every worker keeps the same members and DDP stays in step)."""
    bad = [0.0 if math.isfinite(results[m.key].loss) else 1.0 for m in running]
    if collective.world > 1:
        bad = collective.all_sum(bad)
    still = []
    for member, flag in zip(running, bad, strict=True):
        if flag:
            loss = results[member.key].loss
            member.failure = NonFiniteLossError(step, loss if not math.isfinite(loss) else math.nan)
        else:
            still.append(member)
    if not still or len(running) == 1 and still != running:
        raise next(m.failure for m in running if m.failure is not None)
    return still
