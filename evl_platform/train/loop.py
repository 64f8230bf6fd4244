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

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch import nn

from evl_platform.config import TrainConfig
from evl_platform.tracking import names
from evl_platform.train.batch import InputBatch, map_inputs, to_device
from evl_platform.train.errors import NonFiniteLossError
from evl_platform.train.evaluation import EvalResult, evaluate
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
    "Optimization",
    "Report",
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
    "fit",
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
    """Trains from ``start_step`` to ``cfg.num_steps``.

    Every ``cfg.log_every`` steps the metric window is summed over the workers and turned into
    train metrics, every ``cfg.eval_every`` steps the model is validated, every
    ``cfg.checkpoint_every`` steps a checkpoint is due (the callbacks write it); the last step
    does all three. The step time excludes the time spent in these.

    Args:
        net: the model under :class:`EVLForward` (DDP-wrapped with several workers).
        source: the batches.
        cfg: the schedule (``num_steps``, ``log_every``, ``eval_every``, ``checkpoint_every``,
            ``batch_split``).
        optimization: optimizer, schedule, scaler, device and autocast dtype.
        start_step: steps already done (a resumed run's restored step).
        device_seconds: device time already spent (restored with the step).
        collective: how the workers' numbers combine (default: one process).
        callbacks: told about every step, every logging step and every report.

    Returns:
        The last step's report; ``None`` if ``start_step`` is already ``cfg.num_steps``.

    Raises:
        NonFiniteLossError: a step's loss on this worker is NaN or infinite.
    """
    if start_step >= cfg.num_steps:
        return None
    collective = collective or SingleProcess()
    window, timer = Window(), StepTimer()
    for step, batch in batches_from(start_step, source.steps_per_epoch, source.train_batches):
        result = _step(net, batch, optimization, cfg.batch_split)
        window.add(result, timer.lap())
        done = step + 1
        if not math.isfinite(result.loss):
            raise NonFiniteLossError(done, result.loss)
        for callback in callbacks:
            callback.on_step(done, result)
        last = done == cfg.num_steps
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or last:
            metrics, seconds = train_metrics(window, net, source, optimization, collective)
            device_seconds += seconds
            metrics[names.DEVICE_HOURS] = device_seconds / 3600
            for callback in callbacks:
                callback.on_train_metrics(done, metrics)
            window = Window()
        validation = None
        if done % cfg.eval_every == 0 or last:
            local = evaluate(
                net, source.val_batches(), device=optimization.device, amp=optimization.amp
            )
            validation = collective.gather(local)
            metrics |= validation_metrics(validation)
        checkpoint = done % cfg.checkpoint_every == 0 or last
        if metrics or checkpoint:
            report = Report(done, metrics, checkpoint, last, device_seconds, validation)
            for callback in callbacks:
                callback.on_report(report)
            if last:
                return report
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
