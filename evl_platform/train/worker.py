"""The Ray Train worker: one process per device, a thin adapter around :func:`.loop.fit`.

The worker builds the model, optimizer and batch source, restores the checkpoint, and hands
``fit`` its callbacks. Metrics go to ``ray.train.report`` (logged to MLflow once, by the
controller callback); every ``checkpoint_every`` steps rank 0 writes the weights and optimizer
state and every rank its RNG state; the final checkpoint also carries the files the driver
uploads as run artifacts (per-video scores, per-class accuracy, confusion matrix, trained
weights). A non-finite loss raises :class:`~evl_platform.train.errors.NonFiniteLossError`,
which Ray Train treats like any worker error: it restarts the workers from the last
checkpoint up to ``train.max_failures`` times (its ``FailureConfig`` has no per-error
policy), and a loss that goes non-finite again fails the run.
"""

from __future__ import annotations

import datetime
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.models import create_model
from evl_platform.tracking import names
from evl_platform.tracking.artifacts import (
    scores_frame,
    write_confusion_png,
    write_per_class,
    write_scores,
)
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    Callback,
    EvalResult,
    EVLForward,
    Optimization,
    Report,
    StepResult,
    fit,
)
from evl_platform.train.state import (
    TrainingState,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)

STEP = "step"


@dataclass(frozen=True)
class WorkerStep:
    """What a worker hook sees after each optimisation step.

    Attributes:
        step: steps done (1-based).
        rank: this worker's rank.
        world: the number of workers.
        model: this worker's model (the EVL model, not its DDP wrapper).
        loss: this worker's loss of the step.
    """

    step: int
    rank: int
    world: int
    model: nn.Module
    loss: float


WorkerHook = Callable[[WorkerStep], None]
"""Called by every worker after every step (``TrainOptions.worker_hooks``); it travels to the
workers pickled (cloudpickle), and an exception it raises is a worker failure."""


class ProcessGroup:
    """The :class:`~evl_platform.train.loop.Collective` of the Ray Train workers: sums and
    gathers over the default ``torch.distributed`` process group (none with one worker)."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.device, self.world = device, world

    def _joined(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self._joined():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, result: EvalResult) -> EvalResult:
        if not self._joined():
            return result
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result)
        return EvalResult.merge(parts)


class Progress(Callback):
    """Rank 0's progress lines: ``[name] step i/N loss ... ETA`` and ``val acc1``."""

    def __init__(self, cfg: ExperimentConfig, *, rank: int, start: int) -> None:
        self.cfg, self.rank, self.start = cfg, rank, start
        self.began = datetime.datetime.now()

    def on_train_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        total = self.cfg.train.num_steps
        elapsed = datetime.datetime.now() - self.began
        eta = elapsed / max(1, step - self.start) * (total - step)
        print(
            f"[{self.cfg.name}] step {step}/{total}  loss {metrics[names.TRAIN_LOSS]:.4f}  "
            f"acc1 {metrics[names.TRAIN_ACC1]:.1f}%  "
            f"{metrics[names.TRAIN_CLIPS_PER_S]:.1f} clips/s  "
            f"ETA {str(eta).split('.')[0]}",
            flush=True,
        )

    def on_report(self, report: Report) -> None:
        if self.rank != 0 or report.validation is None:
            return
        metrics = report.metrics
        print(
            f"[{self.cfg.name}] step {report.step}  val acc1 {metrics[names.VAL_ACC1]:.2f}%  "
            f"acc5 {metrics[names.VAL_ACC5]:.2f}%  ({len(report.validation.labels)} videos)",
            flush=True,
        )


class Hooks(Callback):
    """Calls the run's :data:`WorkerHook` functions after every step."""

    def __init__(self, hooks: Sequence[WorkerHook], *, rank: int, world: int, model: nn.Module):
        self.hooks, self.rank, self.world, self.model = hooks, rank, world, model

    def on_step(self, step: int, result: StepResult) -> None:
        event = WorkerStep(step, self.rank, self.world, self.model, result.loss)
        for hook in self.hooks:
            hook(event)


class RayReport(Callback):
    """Reports to Ray Train, with a checkpoint (and the run's files, at the end) when due."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        rank: int,
        run_id: str,
        model: nn.Module,
        optimization: Optimization,
        video_ids: Sequence[str],
        class_names: Sequence[str],
    ) -> None:
        self.cfg, self.rank, self.run_id = cfg, rank, run_id
        self.model, self.optimization = model, optimization
        self.video_ids, self.class_names = video_ids, class_names

    def on_report(self, report: Report) -> None:
        payload = {STEP: report.step, **report.metrics}
        if not report.checkpoint:
            ray.train.report(payload)
            return
        optimization = self.optimization
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                Path(directory),
                rank=self.rank,
                model=self.model,
                optimizer=optimization.optimizer,
                scheduler=optimization.scheduler,
                scaler=optimization.scaler,
                step=report.step,
                device_seconds=report.device_seconds,
                cfg=self.cfg,
                run_id=self.run_id,
                metrics=report.metrics,
            )
            if self.rank == 0 and report.last and report.validation is not None:
                self._write_final_files(report.validation, Path(directory) / "final")
            ray.train.report(
                payload,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_{report.step:08d}",
            )

    def _write_final_files(self, result: EvalResult, directory: Path) -> None:
        """The run's artifacts, carried by the last checkpoint to the driver."""
        directory.mkdir()
        classes = list(self.class_names)
        frame = scores_frame(self.video_ids, result.indices, result.labels, result.probs, classes)
        write_scores(frame, directory / names.ARTIFACT_SCORES)
        write_per_class(
            result.per_class_accuracy(len(classes)), classes, directory / names.ARTIFACT_PER_CLASS
        )
        write_confusion_png(
            result.confusion(len(classes)),
            classes,
            directory / names.ARTIFACT_CONFUSION,
            title=f"{self.cfg.name}: {self.cfg.data.dataset} val (top-1 {result.topk(1):.1f}%)",
        )
        torch.save(trainable_state(self.model), directory / names.ARTIFACT_WEIGHTS)


def _quiet_report_logs() -> None:
    """Ray Train logs one INFO line per report, through a logger named after its source
    file; the worker prints its own concise progress instead."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a private module: if it moves, the lines just come back
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _match_threads_to_cpus() -> None:
    """One intra-op thread per CPU this worker reserved: more threads than reserved cores
    oversubscribe the machine when several workers or trials share it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def _restore(
    cfg: ExperimentConfig, model: nn.Module, optimization: Optimization, *, rank: int, run_id: str
) -> TrainingState:
    """The state of Ray Train's checkpoint (after a restart or ``--resume``), else step 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainingState(0, 0.0, run_id)
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(
            Path(directory),
            rank=rank,
            model=model,
            optimizer=optimization.optimizer,
            scheduler=optimization.scheduler,
            scaler=optimization.scaler,
        )
    if rank == 0:
        print(f"[{cfg.name}] restored step {state.step} from {checkpoint.path}", flush=True)
    return state


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``experiment`` (the resolved config as a dict),
    ``run_id`` (MLflow), ``worker_hooks`` (:data:`WorkerHook` functions, may be absent)."""
    cfg = ExperimentConfig.model_validate(config["experiment"])
    _quiet_report_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed * 1000 + rank)
    _match_threads_to_cpus()
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world}")

    model = create_model(cfg, load_weights=not cfg.features.reuse).to(device)
    net: nn.Module = EVLForward(model)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=ids)
    optimization = Optimization.create(model, cfg.train, device)
    state = _restore(cfg, model, optimization, rank=rank, run_id=config["run_id"])
    source, video_ids, class_names = create_source(
        cfg, rank=rank, world=world, batch=cfg.train.batch_size // world, device=device
    )
    if state.metrics:  # the driver may have died between saving and logging them
        ray.train.report({STEP: state.step, **state.metrics})
    callbacks = [
        Progress(cfg, rank=rank, start=state.step),
        Hooks(config.get("worker_hooks") or (), rank=rank, world=world, model=model),
        RayReport(
            cfg,
            rank=rank,
            run_id=config["run_id"],
            model=model,
            optimization=optimization,
            video_ids=video_ids,
            class_names=class_names,
        ),
    ]
    fit(
        net,
        source,
        cfg.train,
        optimization=optimization,
        start_step=state.step,
        device_seconds=state.device_seconds,
        collective=ProcessGroup(device, world),
        callbacks=callbacks,
    )
