"""The training loop in plain PyTorch (no Ray: the Ray worker wraps it, supplying callbacks).

:func:`fit` runs the steps from a start step to ``train.num_steps``: it keeps the metric
window, times the steps (logging, validation and checkpoints excluded), validates every
``train.eval_every`` steps, asks for a checkpoint every ``train.checkpoint_every`` steps, logs
every ``train.log_every`` steps (the last step does all three) and stops at the first
non-finite loss. What happens with the results (all-reduce over workers, reports, checkpoint
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
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.tracking import names
from evl_platform.train.batch import InputBatch, Inputs, map_inputs, to_device
from evl_platform.train.evaluation import EvalResult, evaluate, evaluate_members
from evl_platform.train.member import Member, RngState, Window, stop_non_finite
from evl_platform.train.step import (
    EVLForward,
    Optimization,
    StepResult,
    amp_dtype,
    create_optimizer,
    create_scaler,
    create_schedule,
    train_step,
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
    "validation_metrics",
]


class StepTimer:
    """Wall time of the steps run since the last :meth:`lap`."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or creation)."""
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        return elapsed


def batches_from(step: int, steps_per_epoch: int, epoch_batches: Callable) -> Iterator:
    """Yields ``(step, batch)`` forever from ``step`` on, epoch after epoch.

    Args:
        step: the next step to run (0, or the restored step after a resume).
        steps_per_epoch: batches per epoch.
        epoch_batches: ``(epoch, first_batch) -> iterable of batches`` of one epoch.
    """
    epoch, first = divmod(step, steps_per_epoch)
    while True:
        for batch in epoch_batches(epoch, first):
            yield step, batch
            step += 1
        epoch, first = epoch + 1, 0


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

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sums of ``values`` over all workers."""
        ...

    def gather(self, result: EvalResult) -> EvalResult:
        """Every worker's validation scores, merged."""
        ...


class SingleProcess:
    """The :class:`Collective` of a run on one process: sums and gathers change nothing."""

    world = 1

    def all_sum(self, values: Sequence[float]) -> list[float]:
        return [float(v) for v in values]

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
        """After every optimisation step (with a finite loss); ``step`` counts steps done."""

    def on_train_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """At a logging step, with the train metrics over all workers, before validation."""

    def on_report(self, report: Report) -> None:
        """At every step that logs, validates or checkpoints, after validation."""


SharedForward = Callable[[Inputs], Any]
"""What a pack computes once per batch for all its members (the frozen backbone's features of
the blocks any member reads); each member's ``select`` picks its own inputs from it."""


def fit(
    net: EVLForward | nn.parallel.DistributedDataParallel,
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

    Every ``cfg.log_every`` steps each member's metric window is summed over the workers and
    turned into train metrics, every ``cfg.eval_every`` steps the members are validated, every
    ``cfg.checkpoint_every`` steps a checkpoint is due (the callbacks write it); the last step
    does all three. The step time excludes the time spent in these. Per batch, ``shared`` (if
    given) runs once and each member reads ``select[key]`` of its result; then each member takes
    its optimisation step in turn. A member whose loss is not finite (on any worker) stops with
    its :attr:`Member.failure`, the others go on; with one member, or when the last one stops,
    the error is raised.

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
    if start_step >= cfg.num_steps:
        return {}
    collective = collective or SingleProcess()
    spent = {m.key: (device_seconds or {}).get(m.key, 0.0) for m in members}
    timer = StepTimer()
    running = [m for m in members if m.failure is None]
    if not running:
        return {}
    for step, batch in batches_from(start_step, source.steps_per_epoch, source.train_batches):
        done = step + 1
        inputs = batch.inputs if shared is None else shared(batch.inputs)
        shared_seconds = timer.lap() / max(1, len(running))
        results = {}
        for member in running:
            own = inputs if select is None else select[member.key](inputs)
            with member.own_rng():
                results[member.key] = _step(
                    member.net,
                    InputBatch(own, batch.labels, batch.indices),
                    member.optimization,
                    cfg.batch_split,
                )
            member.window.add(results[member.key], timer.lap() + shared_seconds)
        running = stop_non_finite(running, results, done, collective)
        for member in running:
            for callback in member.callbacks:
                callback.on_step(done, results[member.key])
        last = done == cfg.num_steps
        metrics: dict[str, dict[str, float]] = {m.key: {} for m in running}
        if done % cfg.log_every == 0 or last:
            for member in running:
                found, seconds = train_metrics(
                    member.window, member.net, source, member.optimization, collective
                )
                spent[member.key] += seconds
                found[names.DEVICE_HOURS] = spent[member.key] / 3600
                for callback in member.callbacks:
                    callback.on_train_metrics(done, found)
                metrics[member.key] = found
                member.window = Window()
        validations: dict[str, EvalResult] = {}
        if done % cfg.eval_every == 0 or last:
            device, amp = running[0].optimization.device, running[0].optimization.amp
            local = evaluate_members(
                {m.key: m.net for m in running},
                source.val_batches(),
                device=device,
                amp=amp,
                shared=shared,
                select=select,
            )
            for key, result in local.items():
                validations[key] = collective.gather(result)
                metrics[key] |= validation_metrics(validations[key])
        checkpoint = done % cfg.checkpoint_every == 0 or last
        if any(metrics.values()) or checkpoint:
            reports = {
                m.key: Report(
                    done, metrics[m.key], checkpoint, last, spent[m.key], validations.get(m.key)
                )
                for m in running
            }
            for member in running:
                for callback in member.callbacks:
                    callback.on_report(reports[member.key])
            if after_report is not None:
                after_report(done, reports)
            if last:
                return reports
            timer.lap()  # logging, validation and checkpoints are not step time
    raise AssertionError("unreachable: batches_from never ends")


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


def train_metrics(
    window: Window,
    net: nn.Module,
    source: TrainSource,
    optimization: Optimization,
    collective: Collective,
) -> tuple[dict[str, float], float]:
    """The train metrics of a window summed over the workers, and its device seconds."""
    loss_sum, hits, clips, seconds, bad, images = collective.all_sum(
        [
            window.loss_sum,
            window.hits,
            window.clips,
            window.seconds,
            source.bad_videos,
            _forward_images(net),
        ]
    )
    wall = seconds / collective.world
    metrics = {
        names.TRAIN_LOSS: loss_sum / clips,
        names.TRAIN_ACC1: hits / clips * 100,
        names.TRAIN_LR: optimization.optimizer.param_groups[0]["lr"],
        names.TRAIN_CLIPS_PER_S: clips / wall if wall > 0 else 0.0,
        names.BAD_VIDEOS: bad,
        names.BACKBONE_FORWARD_IMAGES: images,
    }
    return metrics, seconds


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


def _forward_images(net: nn.Module) -> int:
    """Images the model's backbone has encoded (none while training on cached features)."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        net = net.module
    return net.model.forward_images
