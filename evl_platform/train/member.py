"""The models a training loop trains, each with its own statistics and random numbers.

A run of its own is one :class:`Member`; a pack (several decoders on one frozen backbone, see
:mod:`evl_platform.train.pack`) is several, each drawing its dropout from its own
:class:`RngState` so that it draws what it would alone.

Nothing here waits for the device between logging steps: a member's :class:`Window` keeps
its loss sum, hits and the step of its first non-finite loss as device tensors, and
:func:`stop_non_finite` reads the latter for every member at once, only at the steps that
report (log, validate or checkpoint).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from evl_platform.tracking import names
from evl_platform.train.errors import NonFiniteLossError
from evl_platform.train.step import Optimization, StepResult, unwrap

if TYPE_CHECKING:
    from evl_platform.train.loop import Callback, Collective, TrainSource


class Window:
    """Training statistics of this worker's steps since the last logged step.

    Loss sum, hits and the first non-finite step stay on the device until :func:`read`.

    Attributes:
        loss_sum: loss times clips, summed (0-dim device tensor; ``None`` before a step).
        hits: top-1 hits (0-dim device tensor; ``None`` before a step).
        first_bad: the first step whose loss was not finite, +inf if none (0-dim float64).
        bad_loss: that step's loss (0-dim float32; NaN if none).
        clips: clips trained on.
        steps: steps added.
        seconds: wall time of the steps (batch loading and the update; not logging,
            validation or checkpoints).
        data_seconds: of ``seconds``, the time spent waiting for the next batch.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.hits: torch.Tensor | None = None
        self.first_bad: torch.Tensor | None = None
        self.bad_loss: torch.Tensor | None = None
        self.clips = self.steps = 0
        self.seconds = self.data_seconds = 0.0

    def add(self, result: StepResult, step: int, seconds: float, data_seconds: float) -> None:
        """Adds step ``step``'s result, on the device (no host sync)."""
        loss = result.loss.detach().float()
        if self.loss_sum is None:
            self.loss_sum = torch.zeros_like(loss)
            self.hits = torch.zeros_like(result.hits)
            self.first_bad = torch.full((), math.inf, dtype=torch.float64, device=loss.device)
            self.bad_loss = torch.full_like(loss, math.nan)
        assert self.hits is not None and self.first_bad is not None and self.bad_loss is not None
        self.loss_sum += loss * result.clips
        self.hits += result.hits
        first = ~torch.isfinite(loss) & torch.isinf(self.first_bad)
        self.first_bad = torch.where(first, float(step), self.first_bad)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.clips += result.clips
        self.steps += 1
        self.seconds += seconds
        self.data_seconds += data_seconds

    class Totals(NamedTuple):
        """A window's numbers, as :meth:`Window.totals` lays them out."""

        loss_sum: float
        hits: float
        clips: float
        seconds: float
        data_seconds: float
        steps: float

    def totals(self, device: torch.device) -> torch.Tensor:
        """(6,) float64 on ``device``: the fields of :class:`Window.Totals` (no host sync)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        on_device = [zero if t is None else t.double() for t in (self.loss_sum, self.hits)]
        host = [self.clips, self.seconds, self.data_seconds, self.steps]
        host_tensor = torch.tensor(host, dtype=torch.float64, device=device)
        return torch.cat([torch.stack(on_device), host_tensor])

    def first_bad_step(self, device: torch.device) -> torch.Tensor:
        """The first non-finite step (+inf if none), a 0-dim float64 tensor on ``device``."""
        if self.first_bad is None:
            return torch.full((), math.inf, dtype=torch.float64, device=device)
        return self.first_bad


@dataclass
class Member:
    """One model :func:`fit_members` trains: a run of its own, or one decoder of a pack.

    Attributes:
        key: its name among the loop's members (``""`` for a run of its own).
        net: what :func:`~evl_platform.train.step.train_step` calls
            (:func:`~evl_platform.train.step.create_forward`: DDP around its trainable part
            with several workers).
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
    """The torch RNG state of the CPU and, on CUDA, of the training device (and of no other).

    Attributes:
        cpu: the CPU generator's state.
        cuda: the CUDA generator's state of ``device``; ``None`` on a CPU device.
        device: the device whose CUDA generator ``cuda`` belongs to.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @staticmethod
    def capture(device: torch.device) -> RngState:
        """The current state of the CPU generator and of ``device``'s CUDA generator."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return RngState(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        """Makes this the current state (the CUDA part on its own device)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def save(self, path: Path) -> None:
        """Writes the state (a checkpoint's ``rng_rank<r>.pt``)."""
        state = {"cpu": self.cpu} | ({} if self.cuda is None else {"cuda": self.cuda})
        torch.save(state, path)

    @staticmethod
    def load(path: Path, device: torch.device) -> RngState:
        """The state :meth:`save` wrote, for ``device`` (a CUDA part is dropped on a CPU)."""
        state = torch.load(path, weights_only=True)
        cuda = state.get("cuda") if device.type == "cuda" else None
        return RngState(state["cpu"], cuda, device)


def train_metrics(
    members: Sequence[Member], source: TrainSource, collective: Collective
) -> dict[str, tuple[dict[str, float], float]]:
    """Each member's train metrics, its window summed over the workers, and its device
    seconds: one all-reduce and one read for all members.

    ``data/wait_s`` is the mean time a step waited for its batch (seconds per step, averaged
    over the window's steps and the workers); a value near the step time means the device
    starves for data.
    """
    device = members[0].optimization.device
    shared = [source.bad_videos, unwrap(members[0].net).forward_images]
    rows = [m.window.totals(device) for m in members]
    summed = collective.all_sum(torch.cat([*rows, torch.tensor(shared, device=device).double()]))
    bad, images = summed[-2:]
    found, width = {}, len(Window.Totals._fields)
    for i, member in enumerate(members):
        totals = Window.Totals(*summed[i * width : (i + 1) * width])
        wall = totals.seconds / collective.world
        metrics = {
            names.TRAIN_LOSS: totals.loss_sum / totals.clips,
            names.TRAIN_ACC1: totals.hits / totals.clips * 100,
            names.TRAIN_LR: member.optimization.optimizer.param_groups[0]["lr"],
            names.TRAIN_CLIPS_PER_S: totals.clips / wall if wall > 0 else 0.0,
            names.DATA_WAIT: totals.data_seconds / max(totals.steps, 1),
            names.BAD_VIDEOS: bad,
            names.BACKBONE_FORWARD_IMAGES: images,
        }
        found[member.key] = metrics, totals.seconds
    return found


def stop_non_finite(running: list[Member], step: int, collective: Collective) -> list[Member]:
    """The members still running at reporting step ``step``.

    A member whose loss was not finite at some step since the last check (on any worker)
    stops, with the first such step in its :attr:`Member.failure`. The steps are checked on
    the device as they run (:meth:`Window.add`) and read here for all members at once: one
    all-reduce (minimum over the workers, so every worker keeps the same members and DDP
    stays in step) and one read. A member whose loss goes non-finite therefore takes its
    remaining steps up to the next reporting step with non-finite weights; they are wasted,
    never reported or checkpointed: its last checkpoint is from before the failure.

    Raises:
        NonFiniteLossError: the only member, or every member, stopped.
    """
    device = running[0].optimization.device
    local = torch.stack([m.window.first_bad_step(device) for m in running])
    first = collective.all_min(local)
    still = []
    for member, bad in zip(running, first, strict=True):
        if math.isfinite(bad):
            member.failure = NonFiniteLossError(int(bad), _bad_loss(member.window, bad))
        else:
            still.append(member)
    if not still or len(running) == 1 and still != running:
        raise next(m.failure for m in running if m.failure is not None)
    return still


def _bad_loss(window: Window, step: float) -> float:
    """This worker's loss at ``step`` if it went non-finite there, else NaN (read once, on
    failure)."""
    if window.first_bad is None or window.bad_loss is None:
        return math.nan
    mine = float(window.first_bad.item()) == step
    return float(window.bad_loss.item()) if mine else math.nan
