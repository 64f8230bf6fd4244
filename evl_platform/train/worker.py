"""The Ray Train worker: one process per device, a thin adapter around :func:`.loop.fit_members`.

The worker trains one model, or a pack of decoders on one frozen backbone (a sweep's packed
trial: the backbone runs once per batch, see :mod:`evl_platform.train.pack`). It builds the
models, optimizers and batch source, restores the checkpoint, and hands ``fit_members`` its
callbacks. Metrics go to ``ray.train.report`` (logged to MLflow once, by the
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from evl_platform.config import ExperimentConfig
from evl_platform.tracking import names
from evl_platform.tracking.artifacts import (
    scores_frame,
    write_confusion_png,
    write_per_class,
    write_scores,
)
from evl_platform.tracking.system import start_system_metrics, stop_system_metrics
from evl_platform.train.inputs import create_source
from evl_platform.train.loop import (
    Callback,
    EvalResult,
    Member,
    Optimization,
    Report,
    create_forward,
    fit_members,
    unwrap,
)
from evl_platform.train.pack import BuiltPack, build_pack
from evl_platform.train.state import (
    FINAL_FILES,
    TrainingState,
    load_checkpoint,
    read_pack_state,
    save_checkpoint,
    trainable_state,
    write_pack_state,
)


class ProcessGroup:
    """The :class:`~evl_platform.train.loop.Collective` of the Ray Train workers: sums and
    gathers over the default ``torch.distributed`` process group (none with one worker)."""

    def __init__(self, device: torch.device, world: int) -> None:
        self.device, self.world = device, world

    def _joined(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def all_sum(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def all_min(self, values: torch.Tensor) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MIN)

    def _reduce(self, values: Sequence[float] | torch.Tensor, op: dist.ReduceOp) -> list[float]:
        """One all-reduce and one read of ``values`` as float64 on this worker's device."""
        if isinstance(values, torch.Tensor):
            tensor = values.to(self.device, torch.float64)
        else:
            tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self._joined():
            dist.all_reduce(tensor, op=op)
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


class RayReport:
    """Reports every member's metrics to Ray Train in one report per reporting step, with one
    checkpoint holding every member (and, at the end, the files the driver uploads)."""

    def __init__(
        self,
        members: Sequence[Member],
        cfgs: Mapping[str, ExperimentConfig],
        run_ids: Mapping[str, str],
        *,
        rank: int,
        world: int,
        video_ids: Sequence[str],
        class_names: Sequence[str],
    ) -> None:
        self.members, self.cfgs, self.run_ids = members, cfgs, run_ids
        self.rank, self.world = rank, world
        self.video_ids, self.class_names = video_ids, class_names
        self.validation_seconds = 0.0

    def timings(self, reports: Mapping[str, Report]) -> dict[str, float]:
        """This worker loop's step and validation time (the last report's payload)."""
        steps = sum(r.device_seconds for r in reports.values()) / self.world
        return {names.TIME_TRAIN: steps, names.TIME_VALIDATION: self.validation_seconds}

    def __call__(self, step: int, reports: dict[str, Report]) -> None:
        payload: dict[str, Any] = {names.REPORT_STEP: step}
        for key, report in reports.items():
            payload |= {names.member_metric(key, k): v for k, v in report.metrics.items()}
        validated = [r.validation.seconds for r in reports.values() if r.validation is not None]
        self.validation_seconds += max(validated, default=0.0)
        if any(r.last for r in reports.values()):
            payload |= self.timings(reports)
        if not any(r.checkpoint for r in reports.values()):
            ray.train.report(payload)
            return
        with tempfile.TemporaryDirectory() as directory:
            root = Path(directory)
            for member in self.members:
                if member.key in reports:
                    self._save(member, reports[member.key], root / member.key)
            if self.rank == 0:
                write_pack_state(root, self.members)
            ray.train.report(
                payload,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )

    def _save(self, member: Member, report: Report, directory: Path) -> None:
        cfg, optimization = self.cfgs[member.key], member.optimization
        model = unwrap(member.net)
        with member.own_rng():  # the member's own RNG state goes into its rng file
            save_checkpoint(
                directory,
                rank=self.rank,
                model=model,
                optimizer=optimization.optimizer,
                scheduler=optimization.scheduler,
                scaler=optimization.scaler,
                step=report.step,
                device_seconds=report.device_seconds,
                cfg=cfg,
                run_id=self.run_ids[member.key],
                metrics=report.metrics,
                device=optimization.device,
            )
        if self.rank == 0 and report.last and report.validation is not None:
            self._write_final_files(cfg, model, report.validation, directory / FINAL_FILES)

    def _write_final_files(
        self, cfg: ExperimentConfig, model: nn.Module, result: EvalResult, directory: Path
    ) -> None:
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
            title=f"{cfg.name}: {cfg.data.dataset} val (top-1 {result.topk(1):.1f}%)",
        )
        torch.save(trainable_state(model), directory / names.ARTIFACT_WEIGHTS)


def claim_device() -> torch.device:
    """This worker's device, made the current CUDA device before anything touches CUDA (so
    that ``all_gather_object``, RNG calls and new tensors use it, not ``cuda:0``)."""
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def create_members(
    built: BuiltPack, cfgs: Mapping[str, ExperimentConfig], *, device: torch.device, world: int
) -> list[Member]:
    """One :class:`Member` per built model: its forward (DDP around its trainable part with
    several workers, :func:`~evl_platform.train.step.create_forward`), its optimisation and
    its RNG state."""
    members = []
    for key, model in built.models.items():
        net = create_forward(model, device=device, distributed=world > 1)
        optimization = Optimization.create(model, cfgs[key].train, device)
        members.append(Member(key, net, optimization, rng=built.rngs.get(key)))
    return members


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
    members: Sequence[Member], cfgs: Mapping[str, ExperimentConfig], *, rank: int
) -> tuple[int, dict[str, TrainingState]]:
    """The step and per-member state of Ray Train's checkpoint (after a restart or
    ``--resume``), else step 0; members that had stopped get their failure back."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    states = {}
    with checkpoint.as_directory() as directory:
        root = Path(directory)
        failures = read_pack_state(root)
        for member in members:
            if member.key in failures:
                member.failure = failures[member.key]
                continue
            optimization = member.optimization
            with member.own_rng():  # its rng file becomes the member's RNG state
                states[member.key] = load_checkpoint(
                    root / member.key,
                    rank=rank,
                    model=unwrap(member.net),
                    optimizer=optimization.optimizer,
                    scheduler=optimization.scheduler,
                    scaler=optimization.scaler,
                    device=optimization.device,
                )
    step = next(iter(states.values())).step if states else 0
    if rank == 0:
        names_ = ", ".join(cfgs[k].name for k in states)
        print(f"[{names_}] restored step {step} from {checkpoint.path}", flush=True)
    return step, states


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``members``, one ``{key, experiment, run_id}`` per
    model (``experiment`` the resolved config as a dict, ``run_id`` its MLflow run; one member
    with key ``""`` for a run of its own, several for a pack)."""
    cfgs = {m["key"]: ExperimentConfig.model_validate(m["experiment"]) for m in config["members"]}
    run_ids = {m["key"]: m["run_id"] for m in config["members"]}
    lead = next(iter(cfgs.values()))
    _quiet_report_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = claim_device()
    _match_threads_to_cpus()
    if lead.train.batch_size % world:
        raise ValueError(f"train.batch_size {lead.train.batch_size} is not divisible by {world}")

    # one system-metrics sampler per node (CPU, memory, GPUs) logs into every run it trains
    monitor = None
    if context.get_local_rank() == 0 and config.get("tracking_uri"):
        monitor = start_system_metrics(
            list(run_ids.values()), config["tracking_uri"], node_rank=context.get_node_rank()
        )
    try:
        _train(cfgs, run_ids, device=device, rank=rank, world=world)
    finally:
        stop_system_metrics(monitor)


def _train(
    cfgs: Mapping[str, ExperimentConfig],
    run_ids: Mapping[str, str],
    *,
    device: torch.device,
    rank: int,
    world: int,
) -> None:
    """Builds this worker's members and source, restores the checkpoint and trains."""
    lead = next(iter(cfgs.values()))
    built = build_pack(cfgs, device=device, rank=rank)
    members = create_members(built, cfgs, device=device, world=world)
    step, states = _restore(members, cfgs, rank=rank)
    source, video_ids, class_names = create_source(
        lead,
        rank=rank,
        world=world,
        batch=lead.train.batch_size // world,
        device=device,
        reads=built.reads if built.shared is not None and lead.features.reuse else None,
    )
    replay = {names.REPORT_STEP: step}
    for key, state in states.items():  # the driver may have died between saving and logging
        replay |= {names.member_metric(key, k): v for k, v in (state.metrics or {}).items()}
    if len(replay) > 1:
        ray.train.report(replay)
    for member in members:
        progress = Progress(cfgs[member.key], rank=rank, start=step)
        member.callbacks = [progress, *member.callbacks]
    report = RayReport(
        members,
        cfgs,
        run_ids,
        rank=rank,
        world=world,
        video_ids=video_ids,
        class_names=class_names,
    )
    fit_members(
        members,
        source,
        lead.train,
        start_step=step,
        device_seconds={k: s.device_seconds for k, s in states.items()},
        collective=ProcessGroup(device, world),
        shared=built.shared,
        select=built.select,
        after_report=report,
    )
