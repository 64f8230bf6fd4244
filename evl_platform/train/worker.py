"""The Ray Train worker: one process per device running :mod:`evl_platform.train.loop`.

Workers only compute and report. Metrics go to ``ray.train.report`` (logged to MLflow once,
by the controller callback); every ``checkpoint_every`` steps rank 0 writes the weights and
optimizer state and every rank its RNG state; the final checkpoint also carries the files the
driver uploads as run artifacts (per-video scores, per-class accuracy, confusion matrix,
trained weights).
"""

from __future__ import annotations

import datetime
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    EvalResult,
    EVLForward,
    StepTimer,
    amp_dtype,
    batches_from,
    create_optimizer,
    create_scaler,
    create_schedule,
    evaluate,
    train_step,
)
from evl_platform.train.state import (
    TrainingState,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)

STEP = "step"


class InjectedFailure(RuntimeError):
    """Raised once by a worker when a test asks for a failure (``fail_at_step``)."""


@dataclass
class Window:
    """Training statistics since the last logged step, on this worker."""

    loss_sum: float = 0.0
    hits: int = 0
    clips: int = 0
    seconds: float = 0.0

    def add(self, loss: float, hits: int, clips: int, seconds: float) -> None:
        self.loss_sum += loss * clips
        self.hits += hits
        self.clips += clips
        self.seconds += seconds


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _gather(result: EvalResult) -> EvalResult:
    if not (dist.is_available() and dist.is_initialized()):
        return result
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    return EvalResult.merge(parts)


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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``experiment`` (the resolved config as a dict),
    ``run_id`` (MLflow), optional ``fail_at_step`` and ``fail_marker`` (tests)."""
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
    optimizer = create_optimizer(model, cfg.train)
    scheduler = create_schedule(optimizer, cfg.train)
    amp = amp_dtype(cfg.train, device)
    scaler = create_scaler(device, amp)
    state = TrainingState(0, 0.0, config["run_id"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(
                Path(directory),
                rank=rank,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
            )
        if rank == 0:
            print(f"[{cfg.name}] restored step {state.step} from {checkpoint.path}", flush=True)
    per_rank = cfg.train.batch_size // world
    source, video_ids, class_names = create_source(
        cfg, rank=rank, world=world, batch=per_rank, device=device
    )
    run = _Run(cfg, config, rank, world, device, model, net, source, video_ids, class_names)
    run.optimizer, run.scheduler, run.scaler, run.amp = optimizer, scheduler, scaler, amp
    run.device_seconds = state.device_seconds
    if state.metrics:  # the driver may have died between saving and logging them
        ray.train.report({STEP: state.step, **state.metrics})
    run.train_from(state.step)


class _Run:
    """The state one worker carries through the step loop."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        config: dict,
        rank: int,
        world: int,
        device: torch.device,
        model: nn.Module,
        net: nn.Module,
        source: Any,
        video_ids: list[str],
        class_names: list[str],
    ) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.model, self.net, self.source = model, net, source
        self.video_ids, self.class_names = video_ids, class_names
        self.run_id = config["run_id"]
        self.fail_at = config.get("fail_at_step")
        self.fail_marker = config.get("fail_marker")
        self.device_seconds = 0.0
        self.final_result: EvalResult | None = None

    def train_from(self, start: int) -> None:
        train = self.cfg.train
        if start >= train.num_steps:
            return
        window, timer, began = Window(), StepTimer(), datetime.datetime.now()
        batches = batches_from(start, self.source.steps_per_epoch, self.source.train_batches)
        for step, batch in batches:
            result = train_step(
                self.net,
                batch,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                device=self.device,
                amp=self.amp,
                batch_split=train.batch_split,
            )
            window.add(result.loss, result.hits, result.clips, timer.lap())
            done = step + 1
            self._maybe_fail(done)
            last = done == train.num_steps
            metrics: dict[str, float] = {}
            if done % train.log_every == 0 or last:
                metrics |= self._train_metrics(window, done, start, began)
                window = Window()
            if done % train.eval_every == 0 or last:
                metrics |= self._validate(done, final=last)
            save = done % train.checkpoint_every == 0 or last
            self._report(done, metrics, checkpoint=save)
            if last:
                return
            if metrics or save:
                timer.lap()  # logging, evaluation and checkpoints are not step time

    def _maybe_fail(self, step: int) -> None:
        if self.fail_at != step or self.rank != self.world - 1 or not self.fail_marker:
            return
        marker = Path(self.fail_marker)
        if not marker.exists():
            marker.write_text(f"failed at step {step}\n")
            raise InjectedFailure(f"injected failure at step {step} (rank {self.rank})")

    def _train_metrics(
        self, window: Window, step: int, start: int, began: datetime.datetime
    ) -> dict[str, float]:
        loss_sum, hits, clips, seconds, bad, images = _all_sum(
            [
                window.loss_sum,
                window.hits,
                window.clips,
                window.seconds,
                self.source.bad_videos,
                self.model.forward_images,
            ],
            self.device,
        )
        self.device_seconds += seconds
        wall = seconds / self.world
        metrics = {
            names.TRAIN_LOSS: loss_sum / clips,
            names.TRAIN_ACC1: hits / clips * 100,
            names.TRAIN_LR: self.optimizer.param_groups[0]["lr"],
            names.TRAIN_CLIPS_PER_S: clips / wall if wall > 0 else 0.0,
            names.DEVICE_HOURS: self.device_seconds / 3600,
            names.BAD_VIDEOS: bad,
            names.BACKBONE_FORWARD_IMAGES: images,
        }
        if self.rank == 0:
            total = self.cfg.train.num_steps
            elapsed = datetime.datetime.now() - began
            eta = elapsed / max(1, step - start) * (total - step)
            print(
                f"[{self.cfg.name}] step {step}/{total}  loss {metrics[names.TRAIN_LOSS]:.4f}  "
                f"acc1 {metrics[names.TRAIN_ACC1]:.1f}%  "
                f"{metrics[names.TRAIN_CLIPS_PER_S]:.1f} clips/s  "
                f"ETA {str(eta).split('.')[0]}",
                flush=True,
            )
        return metrics

    def _validate(self, step: int, *, final: bool) -> dict[str, float]:
        local = evaluate(self.net, self.source.val_batches(), device=self.device, amp=self.amp)
        result = _gather(local)
        if final:
            self.final_result = result
        metrics = {
            names.VAL_LOSS: result.loss,
            names.VAL_ACC1: result.topk(1),
            names.VAL_ACC5: result.topk(5),
            names.VAL_MEAN_CLASS_ACC: float(
                np.nanmean(result.per_class_accuracy(len(self.class_names)))
            ),
            names.VAL_CLIPS_PER_S: len(result.labels) / max(result.seconds, 1e-9),
        }
        if self.rank == 0:
            print(
                f"[{self.cfg.name}] step {step}  val acc1 {metrics[names.VAL_ACC1]:.2f}%  "
                f"acc5 {metrics[names.VAL_ACC5]:.2f}%  ({len(result.labels)} videos)",
                flush=True,
            )
        return metrics

    def _report(self, step: int, metrics: dict[str, float], *, checkpoint: bool) -> None:
        if not metrics and not checkpoint:
            return
        payload = {STEP: step, **metrics}
        if not checkpoint:
            ray.train.report(payload)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                Path(directory),
                rank=self.rank,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                step=step,
                device_seconds=self.device_seconds,
                cfg=self.cfg,
                run_id=self.run_id,
                metrics=metrics,
            )
            if self.rank == 0 and self.final_result is not None:
                self._write_final_files(Path(directory) / "final")
            ray.train.report(
                payload,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )

    def _write_final_files(self, directory: Path) -> None:
        """The run's artifacts, carried by the last checkpoint to the driver."""
        directory.mkdir()
        result, classes = self.final_result, self.class_names
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
