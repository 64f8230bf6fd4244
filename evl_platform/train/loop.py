"""The training loop in plain PyTorch (no Ray: the Ray worker wraps it, supplying callbacks).

:func:`fit` runs the steps from a start step to ``train.num_steps``: it keeps the metric
window, times the steps (logging, validation and checkpoints excluded), validates every
``train.eval_every`` steps, asks for a checkpoint every ``train.checkpoint_every`` steps, logs
every ``train.log_every`` steps (the last step does all three) and stops a member whose loss
went non-finite (checked on the device every step, read at the steps that report: nothing in
a step waits for the device). The time each step waited for its batch is logged as
``data/wait_s``. What happens with the results (all-reduce over workers, reports, checkpoint
files, progress lines) is up to the :class:`Collective` and the :class:`Callback` objects it
is given. One step and its optimizer: :mod:`evl_platform.train.step`; batches:
:mod:`evl_platform.train.batch`; evaluation: :mod:`evl_platform.train.evaluation` (their
public names are re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.tracking import names
from evl_platform.train.batch import (
    InputBatch,
    Inputs,
    StepTimer,
    batches_from,
    map_inputs,
    to_device,
)
from evl_platform.train.evaluation import EvalResult, evaluate, evaluate_members
from evl_platform.train.member import (
    Member,
    RngState,
    Window,
    stop_non_finite,
    train_metrics,
)
from evl_platform.train.step import (
    EVLForward,
    Optimization,
    StepResult,
    amp_dtype,
    create_forward,
    create_optimizer,
    create_scaler,
    create_schedule,
    train_step,
    unwrap,
)

__all__ = [
    "Callback",
    "Collective",
    "EVLForward",
    "EvalResult",
    "InputBatch",
    "Member",
    "Optimization",
    "Report",
    "RngState",
    "SharedForward",
    "SingleProcess",
    "StepResult",
    "StepTimer",
    "TrainSource",
    "Window",
    "amp_dtype",
    "batches_from",
    "create_forward",
    "create_optimizer",
    "create_scaler",
    "create_schedule",
    "evaluate",
    "evaluate_members",
    "fit",
    "fit_members",
    "map_inputs",
    "to_device",
    "train_metrics",
    "train_step",
    "unwrap",
    "validation_metrics",
]


class TrainSource(Protocol):
    """Where :func:`fit` takes its batches from (:mod:`evl_platform.train.inputs`)."""

    steps_per_epoch: int
    bad_videos: int

    def train_batches(self, epoch: int, first: int) -> Iterable[InputBatch]:
        """This worker's training batches of ``epoch`` from batch ``first`` on."""
        ...

    def val_batches(self) -> Iterable[InputBatch]:
        """This worker's share of the validation videos, all views."""
        ...


class Collective(Protocol):
    """How the workers of one data-parallel run combine what each of them measured."""

    world: int

    def all_sum(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        """The element-wise sums of ``values`` (numbers, or a 1-D tensor on the training
        device) over all workers."""
        ...

    def all_min(self, values: torch.Tensor) -> list[float]:
        """The element-wise minima of a 1-D tensor on the training device over all
        workers."""
        ...

    def gather(self, result: EvalResult) -> EvalResult:
        """Every worker's validation scores, merged."""
        ...


class SingleProcess:
    """The :class:`Collective` of a run on one process: sums and gathers change nothing."""

    world = 1

    def all_sum(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        if isinstance(values, torch.Tensor):
            return values.double().tolist()
        return [float(v) for v in values]

    def all_min(self, values: torch.Tensor) -> list[float]:
        return values.double().tolist()

    def gather(self, result: EvalResult) -> EvalResult:
        return result


@dataclass
class Report:
    """What one step that logs, validates or checkpoints hands to :meth:`Callback.on_report`.

    Attributes:
        step: steps done (1-based).
        metrics: the train metrics (logging steps) and validation metrics (validation steps),
            over all workers, by their names in :mod:`evl_platform.tracking.names`.
        checkpoint: a checkpoint is due at this step.
        last: this is step ``train.num_steps``.
        device_seconds: step time summed over workers and all steps logged so far.
        validation: the merged validation scores, on validation steps.
    """

    step: int
    metrics: dict[str, float]
    checkpoint: bool
    last: bool
    device_seconds: float
    validation: EvalResult | None = field(default=None, repr=False)


class Callback:
    """What :func:`fit` tells the code around it; every hook does nothing unless overridden."""

    def on_step(self, step: int, result: StepResult) -> None:
        """After every optimisation step; ``step`` counts steps done. ``result`` stays on
        the device (reading it waits for the device) and its loss may be non-finite: the
        loop finds that at the next reporting step."""

    def on_train_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """At a logging step, with the train metrics over all workers, before validation."""

    def on_report(self, report: Report) -> None:
        """At every step that logs, validates or checkpoints, after validation."""


SharedForward = Callable[[Inputs], Any]
"""What a pack computes once per batch for all its members (the frozen backbone's features of
the blocks any member reads); each member's ``select`` picks its own inputs from it."""


def fit(
    net: nn.Module,
    source: TrainSource,
    cfg: TrainConfig,
    *,
    optimization: Optimization,
    start_step: int = 0,
    device_seconds: float = 0.0,
    collective: Collective | None = None,
    callbacks: Sequence[Callback] = (),
) -> Report | None:
    """Trains one model from ``start_step`` to ``cfg.num_steps`` (:func:`fit_members` with one
    member).

    Returns:
        The last step's report; ``None`` if ``start_step`` is already ``cfg.num_steps``.

    Raises:
        NonFiniteLossError: a step's loss on this worker is NaN or infinite.
    """
    member = Member("", net, optimization, callbacks)
    reports = fit_members(
        [member],
        source,
        cfg,
        start_step=start_step,
        device_seconds={"": device_seconds},
        collective=collective,
    )
    return reports.get("")


def fit_members(
    members: Sequence[Member],
    source: TrainSource,
    cfg: TrainConfig,
    *,
    start_step: int = 0,
    device_seconds: Mapping[str, float] | None = None,
    collective: Collective | None = None,
    shared: SharedForward | None = None,
    select: Mapping[str, Callable[[Any], Inputs]] | None = None,
    after_report: Callable[[int, dict[str, Report]], None] | None = None,
) -> dict[str, Report]:
    """Trains every member from ``start_step`` to ``cfg.num_steps`` on the same batches.

    Each step, :meth:`_Fit.step` runs ``shared`` (if given) once on the batch and each member
    its optimisation step on ``select[key]`` of the result, without waiting for the device.
    At a reporting step (every ``cfg.log_every``, ``cfg.eval_every`` or
    ``cfg.checkpoint_every`` steps, and the last) the members whose loss went non-finite stop
    (:func:`~evl_platform.train.member.stop_non_finite`: the others go on; with one member,
    or when the last one stops, the error is raised), then the loop logs (each member's
    window summed over the workers into train metrics), validates, and reports (the
    callbacks write checkpoints). The step time excludes these.

    Args:
        members: the models, each with its optimisation and callbacks.
        source: the batches.
        cfg: the schedule (``num_steps``, ``log_every``, ``eval_every``, ``checkpoint_every``,
            ``batch_split``), the same for every member.
        start_step: steps already done (a resumed run's restored step).
        device_seconds: device time each member already spent (restored with the step).
        collective: how the workers' numbers combine (default: one process).
        shared: the per-batch computation the members share (default: none, each member
            reads the batch's inputs).
        select: member key -> its inputs from ``shared``'s result.
        after_report: called at every reporting step with every running member's report,
            after their callbacks (a pack writes its one checkpoint here).

    Returns:
        The last step's report of every member that did not stop (empty if ``start_step`` is
        already ``cfg.num_steps``).

    Raises:
        NonFiniteLossError: the loss of the only member, or of the last one running, is NaN
            or infinite.
    """
    running = [m for m in members if m.failure is None]
    if start_step >= cfg.num_steps or not running:
        return {}
    spent = {m.key: (device_seconds or {}).get(m.key, 0.0) for m in running}
    run = _Fit(running, source, cfg, collective or SingleProcess(), shared, select, spent)
    batches = batches_from(start_step, source.steps_per_epoch, source.train_batches)
    for done in range(start_step + 1, cfg.num_steps + 1):
        run.step(done, batches)
        due = _Due.at(done, cfg)
        if not due.any:
            continue
        run.running = stop_non_finite(run.running, done, run.collective)
        metrics = run.log(done) if due.log else {m.key: {} for m in run.running}
        validations = run.validate(metrics) if due.validate else {}
        reports = run.report(done, due, metrics, validations)
        if after_report is not None:
            after_report(done, reports)
        if due.last:
            return reports
        run.timer.lap()  # logging, validation and checkpoints are not step time
    raise AssertionError("unreachable: the last step returns")


@dataclass(frozen=True)
class _Due:
    """What a step does besides training."""

    log: bool
    validate: bool
    checkpoint: bool
    last: bool

    @staticmethod
    def at(done: int, cfg: TrainConfig) -> _Due:
        last = done == cfg.num_steps
        return _Due(
            log=done % cfg.log_every == 0 or last,
            validate=done % cfg.eval_every == 0 or last,
            checkpoint=done % cfg.checkpoint_every == 0 or last,
            last=last,
        )

    @property
    def any(self) -> bool:
        return self.log or self.validate or self.checkpoint


@dataclass
class _Fit:
    """The state :func:`fit_members` carries from step to step, and its jobs."""

    running: list[Member]
    source: TrainSource
    cfg: TrainConfig
    collective: Collective
    shared: SharedForward | None
    select: Mapping[str, Callable[[Any], Inputs]] | None
    spent: dict[str, float]
    timer: StepTimer = field(default_factory=StepTimer)

    def step(self, done: int, batches: Iterator[tuple[int, InputBatch]]) -> None:
        """Step ``done``: waits for its batch, runs ``shared`` once and every member's
        optimisation step; adds each result to the member's window (no host sync)."""
        waiting = time.perf_counter()
        _, batch = next(batches)
        waited = time.perf_counter() - waiting
        inputs = batch.inputs if self.shared is None else self.shared(batch.inputs)
        shared_seconds = self.timer.lap() / len(self.running)
        for member in self.running:
            own = inputs if self.select is None else self.select[member.key](inputs)
            with member.own_rng():
                result = _step(
                    member.net,
                    InputBatch(own, batch.labels, batch.indices),
                    member.optimization,
                    self.cfg.batch_split,
                )
            if len(self.running) > 1:  # a pack holds one member's gradients at a time
                member.optimization.optimizer.zero_grad(set_to_none=True)
            member.window.add(result, done, self.timer.lap() + shared_seconds, waited)
            for callback in member.callbacks:
                callback.on_step(done, result)

    def log(self, done: int) -> dict[str, dict[str, float]]:
        """Every member's train metrics over all workers (one all-reduce); starts new
        windows."""
        found = train_metrics(self.running, self.source, self.collective)
        for member in self.running:
            metrics, seconds = found[member.key]
            self.spent[member.key] += seconds
            metrics[names.DEVICE_HOURS] = self.spent[member.key] / 3600
            for callback in member.callbacks:
                callback.on_train_metrics(done, metrics)
            member.window = Window()
        return {key: metrics for key, (metrics, _) in found.items()}

    def validate(self, metrics: dict[str, dict[str, float]]) -> dict[str, EvalResult]:
        """Every member's validation scores over all workers; adds their metrics."""
        lead = self.running[0].optimization
        local = evaluate_members(
            {m.key: m.net for m in self.running},
            self.source.val_batches(),
            device=lead.device,
            amp=lead.amp,
            shared=self.shared,
            select=self.select,
            batch_split=self.cfg.batch_split,
        )
        validations = {key: self.collective.gather(result) for key, result in local.items()}
        for key, result in validations.items():
            metrics[key] |= validation_metrics(result)
        return validations

    def report(
        self,
        done: int,
        due: _Due,
        metrics: dict[str, dict[str, float]],
        validations: dict[str, EvalResult],
    ) -> dict[str, Report]:
        """Hands every running member's report to its callbacks."""
        reports = {
            m.key: Report(
                done,
                metrics[m.key],
                due.checkpoint,
                due.last,
                self.spent[m.key],
                validations.get(m.key),
            )
            for m in self.running
        }
        for member in self.running:
            for callback in member.callbacks:
                callback.on_report(reports[member.key])
        return reports


def _step(
    net: nn.Module, batch: InputBatch, optimization: Optimization, batch_split: int
) -> StepResult:
    return train_step(
        net,
        batch,
        optimizer=optimization.optimizer,
        scheduler=optimization.scheduler,
        scaler=optimization.scaler,
        device=optimization.device,
        amp=optimization.amp,
        batch_split=batch_split,
    )


def validation_metrics(result: EvalResult) -> dict[str, float]:
    """Loss, top-1/top-5, mean per-class accuracy and throughput of merged scores."""
    num_classes = result.probs.shape[1]
    return {
        names.VAL_LOSS: result.loss,
        names.VAL_ACC1: result.topk(1),
        names.VAL_ACC5: result.topk(5),
        names.VAL_MEAN_CLASS_ACC: float(np.nanmean(result.per_class_accuracy(num_classes))),
        names.VAL_CLIPS_PER_S: len(result.labels) / max(result.seconds, 1e-9),
    }
